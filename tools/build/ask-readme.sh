#!/usr/bin/env bash
# ask-readme.sh URL IMAGE WANT [POLICY]: sends the README's request (IMAGE with "What color
# is the circle?", greedy, policy full) to the server at URL and checks that it answers WANT
# exactly. POLICY "default" leaves elastic_cache out, so the server's default policy answers;
# any other POLICY is sent as elastic_cache.policy. Used by the smoke test (make run) and the
# image check (the built container).
set -euo pipefail
url=$1 image=$2 want=$3 policy=${4:-full}
cache=',"elastic_cache":{"policy":"'"$policy"'"}'
[ "$policy" = default ] && cache=""
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
	printf '{"messages":[{"role":"user","content":[{"type":"text","text":"What color is the circle?"},'
	printf '{"type":"image_url","image_url":{"url":"data:image/png;base64,%s"}}]}],' "$(base64 -w0 "$image")"
	printf '"max_tokens":16,"temperature":0%s}' "$cache"
} >"$tmp/request.json"
t0=$SECONDS
status=$(curl -sS -o "$tmp/response.json" -w '%{http_code}' -H 'Content-Type: application/json' \
	--data-binary @"$tmp/request.json" "$url/v1/chat/completions") || { echo "request failed" >&2; exit 1; }
echo "HTTP $status in $((SECONDS - t0))s: $(head -c 600 "$tmp/response.json")"
[ "$status" = 200 ] || { echo "HTTP status $status, want 200" >&2; exit 1; }
if command -v python3 >/dev/null; then
	got=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["choices"][0]["message"]["content"], end="")' \
		"$tmp/response.json") || { echo "response is not a chat completion" >&2; exit 1; }
	[ "$got" = "$want" ] || { echo "answer \"$got\", want \"$want\"" >&2; exit 1; }
else
	grep -qE '"content":"'"$want"'"[,}]' "$tmp/response.json" || { echo "answer is not \"$want\"" >&2; exit 1; }
fi
echo "answer \"$want\" as expected (policy $policy)"
