"""Train the tokenizers cpmkit ships, from ../shared/corpus/tinyshakespeare.txt (run by hand; the outputs
are committed):

- the demo model's SentencePiece BPE (2048 pieces, byte fallback, llama-style ids: unk 0, bos 1, eos 2) with
  the tokenizer.json, tokenizer_config.json and special_tokens_map.json a MiniCPM repo ships beside it;
- the test fixtures' SentencePiece model (997 pieces: an odd vocabulary, like MiniCPM's 122753 and 73440);
- the test fixtures' byte-level BPE tokenizer.json in MiniCPM5's style (bos <s> 0, eos </s> 1, ChatML tokens).

Only the first TRAIN_CHARS characters of the corpus are used: the rest is the demo's held-out text.

    python scripts/make_tokenizers.py [--corpus ../shared/corpus/tinyshakespeare.txt]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "cpmkit" / "demo" / "model"
FIXTURE_DIR = ROOT / "cpmkit" / "testing" / "data"
TRAIN_CHARS = 1_000_000

CHATML_TOKENS = ["<|im_end|>", "<|im_start|>", "<|tool_call|>", "<|execute_start|>", "<|execute_end|>",
                 "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_sentencepiece(text_file: Path, out_model: Path, vocab_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # the trainer stores its options, model_prefix included, in the model: keep it fixed
        prefix = Path(tmp) / "tokenizer"
        spm.SentencePieceTrainer.train(
            input=str(text_file), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, character_coverage=1.0, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, num_threads=1, normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, minloglevel=2)
        shutil.copy(prefix.with_suffix(".model"), out_model)


def write_hf_files(folder: Path, added: list[str], chat_template: str) -> None:
    """tokenizer.json (converted by transformers) and the json files a MiniCPM4 repo ships beside it."""
    from transformers import AutoTokenizer

    base = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "legacy": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(base))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": added})
    tok.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    first_added = len(tok) - len(added)
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
               for i, t in [(0, "<unk>"), (1, "<s>"), (2, "</s>")] + list(enumerate(added, first_added))}
    config = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
              "additional_special_tokens": added, **base, "chat_template": chat_template,
              "clean_up_tokenization_spaces": False, "model_max_length": 1024, "pad_token": None,
              "sp_model_kwargs": {}, "spaces_between_special_tokens": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (folder / "added_tokens.json").write_text(json.dumps({t: first_added + i for i, t in enumerate(added)},
                                                         indent=2))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "additional_special_tokens": added}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def train_bpe(text_file: Path, out_json: Path, vocab_size: int) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    # MiniCPM5's pre-tokenizer: digits in runs of at most three, then a GPT-4-style split, then bytes
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+"
                                   r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<unk>"] + CHATML_TOKENS[:2] + ["<think>", "</think>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(text_file)], trainer)
    tok.save(str(out_json))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpus" / "tinyshakespeare.txt")
    args = parser.parse_args()
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        train_text = Path(tmp) / "train.txt"
        train_text.write_text(args.corpus.read_text(encoding="utf-8")[:TRAIN_CHARS], encoding="utf-8")

        train_sentencepiece(train_text, DEMO_DIR / "tokenizer.model", 2048)
        write_hf_files(DEMO_DIR, CHATML_TOKENS, CHATML_TEMPLATE)

        train_sentencepiece(train_text, FIXTURE_DIR / "tokenizer.model", 997)
        train_bpe(train_text, FIXTURE_DIR / "bpe_tokenizer.json", 1000)


if __name__ == "__main__":
    main()
