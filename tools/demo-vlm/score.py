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
