#!/usr/bin/env python3
"""The word-level SentencePiece vocabulary of the demo VLM, tokenised as
llama.cpp does (src/llama-vocab.cpp, SPM tokenizer), for training.

The vocabulary comes from internal/testmodel (WordVocabulary) through

  go run ./cmd/mkdemo vocab --out wordvocab.json [--golden golden.json]

Every word of the synthetic language (internal/eval/shapes) and the chat
template's USER / ASSISTANT is one token, as "▁word" after a space and "word"
after a newline; anything else falls back to characters and byte tokens.

The algorithm, as llama_tokenize (parse_special=false) runs it for a "llama"
vocabulary: spaces become "▁", a "▁" is put in front (add_space_prefix), the
UTF-8 bytes are split into characters by lead byte (a continuation or invalid
byte counts as one), then the adjacent pair whose concatenation is a piece with
the highest score is merged (leftmost on a tie), again and again until no pair
is a piece. Left-over symbols that are no piece become one byte token per byte.

  python3 wordvocab.py --vocab wordvocab.json --check golden.json
      compares the token ids of every golden text with llama.cpp's (and the
      round trip of the text); exits 1 on any difference.
  python3 wordvocab.py --vocab wordvocab.json --text "What color is the circle?"
      prints the ids and pieces.

Only the standard library is needed.
"""
import argparse
import heapq
import json
import struct
import sys

SPACE = "\u2581"  # "▁"

NORMAL, UNKNOWN, CONTROL, UNUSED, BYTE = 1, 2, 3, 5, 6


def _f32(x):
    """x rounded to float32, as llama.cpp compares scores."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _char_len(b):
    """llama.cpp's unicode_len_utf8: character length from the lead byte."""
    return (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)[b >> 4]


class WordVocab:
    def __init__(self, data):
        self.pieces = list(data["pieces"])
        self.scores = [_f32(s) for s in data["scores"]]
        self.types = list(data["types"])
        if not (len(self.pieces) == len(self.scores) == len(self.types)):
            raise ValueError("pieces, scores and types differ in length")
        self.bos = data.get("bos_id", 1)
        self.eos = data.get("eos_id", 2)
        self.add_space_prefix = data.get("add_space_prefix", True)
        self.words = list(data.get("words", []))
        self.ids = {}
        for i, p in enumerate(self.pieces):
            self.ids[p.encode("utf-8")] = i  # a later duplicate wins
        self.byte_tok = []
        for b in range(256):
            key = ("<0x%02X>" % b).encode()
            if key not in self.ids:
                raise ValueError("no token for byte 0x%02X" % b)
            self.byte_tok.append(self.ids[key])

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f))

    def __len__(self):
        return len(self.pieces)

    def piece(self, tok):
        return self.pieces[tok] if 0 <= tok < len(self.pieces) else ""

    def tokenize(self, text, add_bos=True):
        """Token ids of text (str or bytes): [BOS] if add_bos, then the text."""
        out = [self.bos] if add_bos else []
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if not data:
            return out
        if self.add_space_prefix:
            data = b" " + data
        data = data.replace(b" ", SPACE.encode("utf-8"))
        return out + self._merge(data)

    def tokenize_piece(self, text):
        """One text piece with its space prefix and no BOS (as vlm.py's)."""
        return self.tokenize(text, add_bos=False)

    def _merge(self, s):
        start, size, prev, nxt = [], [], [], []
        off = 0
        while off < len(s):
            n = min(_char_len(s[off]), len(s) - off)
            start.append(off)
            size.append(n)
            prev.append(len(start) - 2)
            nxt.append(len(start))
            off += n
        nxt[-1] = -1

        heap = []

        def push(left, right):
            if left < 0 or right < 0:
                return
            n = size[left] + size[right]
            tok = self.ids.get(s[start[left]:start[left] + n])
            if tok is None:
                return
            # best score first, then the leftmost
            heapq.heappush(heap, (-self.scores[tok], left, right, n))

        for i in range(1, len(start)):
            push(i - 1, i)
        while heap:
            _, left, right, n = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != n:
                continue  # stale: a side has been merged since
            size[left] += size[right]
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])

        out = []
        i = 0
        while i >= 0:
            text = s[start[i]:start[i] + size[i]]
            tok = self.ids.get(text)
            if tok is not None:
                out.append(tok)
            else:  # a single character that is no piece: its bytes
                out.extend(self.byte_tok[b] for b in text)
            i = nxt[i]
        return out

    def detokenize_bytes(self, tokens):
        """llama_detokenize(remove_special=True, unparse_special=False): normal
        pieces with "▁" as a space, byte tokens as their byte, nothing for the
        other types; the first token's leading space is dropped unless the
        tokens start with BOS (which is dropped)."""
        tokens = list(tokens)
        strip = True
        if tokens and tokens[0] == self.bos:
            tokens = tokens[1:]
            strip = False
        out = bytearray()
        for i, t in enumerate(tokens):
            b = b""
            if 0 <= t < len(self.pieces):
                if self.types[t] == NORMAL:
                    b = self.pieces[t].replace(SPACE, " ").encode("utf-8")
                elif self.types[t] == BYTE:
                    b = bytes([int(self.pieces[t][3:5], 16)])
            if i == 0 and strip and b.startswith(b" "):
                b = b[1:]
            out += b
        return bytes(out)

    def detokenize(self, tokens):
        return self.detokenize_bytes(tokens).decode("utf-8", errors="replace")


def check(vocab, golden_path):
    with open(golden_path, encoding="utf-8") as f:
        golden = json.load(f)
    bad = 0
    for g in golden:
        text, add_bos, want = g["text"], g["add_bos"], g["ids"]
        got = vocab.tokenize(text, add_bos)
        if got != want:
            bad += 1
            print("MISMATCH %r (add_bos %s):\n  python   %s\n  llama.cpp %s" % (
                text, add_bos, [vocab.piece(t) for t in got], [vocab.piece(t) for t in want]))
            continue
        if SPACE not in text:  # a literal "▁" comes back as a space
            back = vocab.detokenize(want)
            expect = " " + text if add_bos and text else text
            if back != expect:
                bad += 1
                print("ROUND TRIP %r -> %r" % (text, back))
    n_words = 0
    for w in vocab.words:  # "w" -> ["▁w"]; "\nw" -> ["▁", <0x0A>, "w"]
        n_words += vocab.tokenize(w, False) == [vocab.ids.get((SPACE + w).encode())]
        n_words += vocab.tokenize("\n" + w, False)[2:] == [vocab.ids.get(w.encode())]
    print("%d/%d golden tokenizations match llama.cpp; vocabulary %d tokens; %d/%d word forms are one token" % (
        len(golden) - bad, len(golden), len(vocab), n_words, 2 * len(vocab.words)))
    return bad == 0 and n_words == 2 * len(vocab.words)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", required=True, help="JSON from `mkdemo vocab --out`")
    ap.add_argument("--check", help="golden JSON from `mkdemo vocab --golden`")
    ap.add_argument("--text", action="append", default=[], help="print the tokens of this text (repeatable)")
    ap.add_argument("--no-bos", action="store_true", help="--text without BOS")
    args = ap.parse_args()
    vocab = WordVocab.load(args.vocab)
    for t in args.text:
        ids = vocab.tokenize(t, not args.no_bos)
        print(len(ids), ids)
        print(" ".join(vocab.piece(i) for i in ids))
    if args.check and not check(vocab, args.check):
        sys.exit(1)


if __name__ == "__main__":
    main()
