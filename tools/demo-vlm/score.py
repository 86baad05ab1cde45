"""Exact-answer scoring, the same rule as internal/eval/answer (Correct)."""
import re

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]


def normalize(s):
    out = []
    for t in re.findall(r"[a-z0-9]+", s.lower()):
        if t in ("a", "an", "the"):
            continue
        if t.isdigit() and int(t) < len(NUMBER_WORDS):
            t = NUMBER_WORDS[int(t)]
        out.append(t)
    return out


def correct(generated, reference):
    ref = normalize(reference)
    if not ref:
        return False
    gen = normalize(generated)
    if len(ref) == 1 and ref[0] in ("yes", "no"):
        for t in gen:
            if t in ("yes", "no"):
                return t == ref[0]
        return False
    n = len(ref)
    return any(gen[i:i + n] == ref for i in range(len(gen) - n + 1))


def rouge_l(generated, reference):
    """ROUGE-L F1 on words (lower case, letters and digits; articles kept):
    the longest common subsequence against both lengths."""
    g = re.findall(r"[a-z0-9]+", generated.lower())
    r = re.findall(r"[a-z0-9]+", reference.lower())
    if not g or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for x in g:
        cur = [0]
        for j, y in enumerate(r):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, q = lcs / len(g), lcs / len(r)
    return 2 * p * q / (p + q)
