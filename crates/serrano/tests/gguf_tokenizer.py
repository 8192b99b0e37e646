"""Writes a Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json) from a
GGUF's byte-level BPE vocabulary, so tools that insist on an HF tokenizer (aiperf) run offline.

usage: gguf_tokenizer.py MODEL.gguf OUT_DIR
"""
import sys

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def field(reader, name):
    f = reader.fields.get(name)
    return None if f is None else f.contents()


def main(model, out):
    r = GGUFReader(model)
    if field(r, "tokenizer.ggml.model") != "gpt2":
        sys.exit("only byte-level BPE (tokenizer.ggml.model = gpt2) vocabularies are supported")
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(r, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # llama.cpp's "smollm" pre-tokenizer: digits one by one, then GPT-2's byte-level split.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Type 3 is a control token: matched whole, never split by the BPE.
    tok.add_special_tokens([AddedToken(t, special=True) for t, k in zip(tokens, types) if k == 3])
    bos, eos = field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=tokens[bos] if bos is not None else None,
        eos_token=tokens[eos] if eos is not None else None,
    )
    template = field(r, "tokenizer.chat_template")
    if template:
        fast.chat_template = template
    fast.save_pretrained(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
