"""A word-level CLIPTokenizer for the captions' closed vocabulary, written as vocab.json + merges.txt.

CLIP's BPE only yields a whole word if merges build it, and merges apply by global rank, so one
word's merges can break another's. The merges are therefore grown word by word against a BPE
that replays them: a new merge has the highest rank, so it never fires inside a word the earlier
merges already assemble.
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(symbols := _bpe(word, ranks)) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
    return list(ranks)


def write_word_tokenizer(directory: str | Path, words: list[str], max_length: int = 16) -> CLIPTokenizer:
    """Save a CLIPTokenizer to ``directory`` that turns each of ``words`` into one token.

    The vocabulary also holds the characters and partial words the merges pass through (the
    tokenizers library insists); ids 0 and 1 are BOS/EOS, then ``words`` in order.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = word_merges(words)
    vocab = [BOS, EOS] + [w + "</w>" for w in words]
    pieces = [p for a, b in merges for p in (a, b, a + b)] + [c for w in words for c in (*w, w[-1] + "</w>")]
    vocab += [p for p in dict.fromkeys(pieces) if p not in vocab]
    tok = CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, merges=merges,
                        model_max_length=max_length, pad_token=EOS, unk_token=EOS)
    tok.save_pretrained(directory)
    return tok
