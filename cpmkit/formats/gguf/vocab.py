"""A checkpoint's tokenizer as GGUF vocabulary keys, exactly as llama.cpp's converter writes them.

Two vocabularies (conversion/base.py, checked at llama.cpp 4df29be4f):

* SentencePiece ``llama`` (``TextModel._create_vocab_sentencepiece`` / ``_set_vocab_sentencepiece``):
  ``vocab_size`` slots pre-filled with ``[PAD{i}]`` / score -10000 / UNUSED; every piece of
  ``tokenizer.model`` below vocab_size with its score and type (UNKNOWN, CONTROL, UNUSED, BYTE, else
  NORMAL); ``added_tokens.json`` entries as USER_DEFINED with score -1000; ``tokenizer_config.json``
  ``added_tokens_decoder`` entries (score -1000) as CONTROL when special or special-looking, else
  USER_DEFINED with "▁" turned into " ". Pre-tokenizer ``default``.
* byte-level BPE ``gpt2`` (``get_vocab_base`` / ``_set_vocab_gpt2``): every id below vocab_size, ``[PAD{i}]``
  / UNUSED for holes, added tokens CONTROL or USER_DEFINED by the same rule, others NORMAL; no scores; the
  merges of tokenizer.json. llama.cpp names the pre-tokenizer by hashing a tokenization of a fixed text;
  here it is named by comparing tokenizer.json's split regexes with the ones llama.cpp implements
  (``BPE_PRE_TOKENIZERS``, from src/llama-vocab.cpp).

Special token ids, add_bos/add_eos and the chat template come from gguf-py's own ``SpecialVocab`` (the
converter's rules: tokenizer.json added tokens matched to tokenizer_config's ``*_token`` first, then
config.json ``*_token_id``; list-valued ids such as MiniCPM4's ``eos_token_id: [2, 73440]`` are ignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import Keys, SpecialVocab, TokenType

from cpmkit.errors import CpmkitError
from cpmkit.formats.gguf.file import Metadata
from cpmkit.jsonfile import read_json_object

PAD_SCORE = -10000.0  # score of a slot no tokenizer piece fills
ADDED_SCORE = -1000.0  # score of an added (control / user-defined) token
SP_SPACE = "\u2581"

# SpecialVocab's token kinds -> the key each is written under (gguf-py has no key for "cls": skipped)
SPECIAL_ID_KEYS = {"bos": Keys.Tokenizer.BOS_ID, "eos": Keys.Tokenizer.EOS_ID, "unk": Keys.Tokenizer.UNK_ID,
                   "sep": Keys.Tokenizer.SEP_ID, "pad": Keys.Tokenizer.PAD_ID, "mask": Keys.Tokenizer.MASK_ID}
ADD_SPECIAL_KEYS = {"bos": Keys.Tokenizer.ADD_BOS, "eos": Keys.Tokenizer.ADD_EOS, "sep": Keys.Tokenizer.ADD_SEP}

# llama.cpp pre-tokenizer name -> the split regexes it runs, in order (src/llama-vocab.cpp). MiniCPM5's are
# the ones of openbmb/MiniCPM5-1B's tokenizer.json (llama.cpp #23384).
BPE_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "minicpm5": (
        r"\p{N}{1,3}",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+",
    ),
}


def add_sentencepiece_vocab(meta: Metadata, root: Path, config: dict[str, Any]) -> None:
    """``_set_vocab_sentencepiece``: the vocabulary MiniCPM and MiniCPM3 are converted with."""
    tokens, scores, types = _sentencepiece_tokens(root, config)
    meta.add(Keys.Tokenizer.MODEL, "llama")
    meta.add(Keys.Tokenizer.PRE, "default")
    meta.add(Keys.Tokenizer.LIST, tokens)
    meta.add(Keys.Tokenizer.SCORES, scores)
    meta.add(Keys.Tokenizer.TOKEN_TYPE, types)
    _add_special(meta, SpecialVocab(root, n_vocab=len(tokens)))


def add_llama_vocab(meta: Metadata, root: Path, config: dict[str, Any]) -> None:
    """``LlamaModel.set_vocab``: add_space_prefix from tokenizer_config, then SentencePiece when
    tokenizer.model exists, else the byte-level BPE of tokenizer.json (MiniCPM5)."""
    add_prefix = read_json_object(root / "tokenizer_config.json", required=False).get("add_prefix_space")
    if add_prefix is not None:
        meta.add(Keys.Tokenizer.ADD_PREFIX, add_prefix)
    if (root / "tokenizer.model").is_file():
        add_sentencepiece_vocab(meta, root, config)
    else:
        add_bpe_vocab(meta, root, config)


def add_bpe_vocab(meta: Metadata, root: Path, config: dict[str, Any]) -> None:
    """``_set_vocab_gpt2``: tokens and types, then merges and special tokens."""
    tokenizer_json = read_json_object(root / "tokenizer.json", required=False)
    if not tokenizer_json:
        raise CpmkitError(f"{root}: no tokenizer.model or tokenizer.json to build the GGUF vocabulary from")
    tokens, types = _bpe_tokens(root, config)
    meta.add(Keys.Tokenizer.MODEL, "gpt2")
    meta.add(Keys.Tokenizer.PRE, bpe_pre_tokenizer(root / "tokenizer.json", tokenizer_json))
    meta.add(Keys.Tokenizer.LIST, tokens)
    meta.add(Keys.Tokenizer.TOKEN_TYPE, types)
    _add_special(meta, SpecialVocab(root, load_merges=True))


def does_token_look_special(token: str) -> bool:
    """``TextModel.does_token_look_special``: added tokens that are control tokens though not marked so."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _sentencepiece_tokens(root: Path, config: dict[str, Any]) -> tuple[list[bytes], list[float], list[int]]:
    import sentencepiece as spm

    model_path = root / "tokenizer.model"
    if not model_path.is_file():
        raise CpmkitError(f"{model_path}: not found; llama.cpp converts this family's vocabulary from the "
                          "SentencePiece model")
    sp = spm.SentencePieceProcessor()
    if not sp.Load(str(model_path)):
        raise CpmkitError(f"{model_path}: not a readable SentencePiece model")
    vocab_size = config.get("vocab_size_per_layer_input") or config.get("vocab_size") or sp.GetPieceSize()
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [PAD_SCORE] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for i in range(min(sp.GetPieceSize(), vocab_size)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = int(_piece_type(sp, i))
    for text, i in read_json_object(root / "added_tokens.json", required=False).items():
        if i < vocab_size:
            tokens[i], scores[i], types[i] = text.encode("utf-8"), ADDED_SCORE, int(TokenType.USER_DEFINED)
    decoder = read_json_object(root / "tokenizer_config.json", required=False).get("added_tokens_decoder", {})
    for key, data in decoder.items():
        i = int(key)
        if i >= vocab_size:
            continue
        text, kind = _added_token(data["content"], bool(data.get("special")))
        tokens[i], scores[i], types[i] = text.encode("utf-8"), ADDED_SCORE, int(kind)
    return tokens, scores, types


def _piece_type(sp, i: int) -> TokenType:
    if sp.IsUnknown(i):
        return TokenType.UNKNOWN
    if sp.IsControl(i):
        return TokenType.CONTROL
    if sp.IsUnused(i):
        return TokenType.UNUSED
    if sp.IsByte(i):
        return TokenType.BYTE
    return TokenType.NORMAL


def _added_token(text: str, special: bool) -> tuple[str, TokenType]:
    if special or does_token_look_special(text):
        return text, TokenType.CONTROL
    return text.replace(SP_SPACE, " "), TokenType.USER_DEFINED  # user-defined spaces are pre-normalised


def _bpe_tokens(root: Path, config: dict[str, Any]) -> tuple[list[str], list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    vocab_size = config.get("vocab_size") or len(vocab)
    if max(vocab.values()) >= vocab_size:
        raise CpmkitError(f"{root / 'tokenizer.json'}: token id {max(vocab.values())} is not below the config's "
                          f"vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif i in added:
            text = by_id[i]
            if not added[i].normalized:  # llama.cpp expects pre-normalised added tokens
                text = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            text, kind = _added_token(text, added[i].special)
            tokens.append(text)
            types.append(int(kind))
        else:
            tokens.append(by_id[i])
            types.append(int(TokenType.NORMAL))
    return tokens, types


def bpe_pre_tokenizer(path: Path, tokenizer_json: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer that splits text as tokenizer.json's pre_tokenizer does."""
    found = _split_regexes(tokenizer_json.get("pre_tokenizer") or {})
    for name, regexes in BPE_PRE_TOKENIZERS.items():
        if found == regexes:
            return name
    raise CpmkitError(f"{path}: its pre-tokenizer ({' then '.join(found) or 'none'}) is not one llama.cpp "
                      f"implements for this family (known: {', '.join(BPE_PRE_TOKENIZERS)}); llama.cpp would "
                      "tokenize text differently")


def _split_regexes(pre: dict[str, Any]) -> tuple[str, ...]:
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return tuple(s["pattern"]["Regex"] for s in steps if s.get("type") == "Split" and "Regex" in s.get("pattern", {}))


def _add_special(meta: Metadata, special: SpecialVocab) -> None:
    """``SpecialVocab.add_to_gguf``'s keys, in its order."""
    if special.merges:
        meta.add(Keys.Tokenizer.MERGES, special.merges)
    for kind, token_id in special.special_token_ids.items():
        if kind in SPECIAL_ID_KEYS:
            meta.add(SPECIAL_ID_KEYS[kind], token_id)
    for kind, value in special.add_special_token.items():
        if kind in ADD_SPECIAL_KEYS:
            meta.add(ADD_SPECIAL_KEYS[kind], value)
    if special.chat_template is not None:
        if not isinstance(special.chat_template, str):
            raise CpmkitError("named chat templates (chat_template.json lists, additional_chat_templates/) are "
                              "not supported; keep one template in tokenizer_config.json or chat_template.jinja")
        meta.add(Keys.Tokenizer.CHAT_TEMPLATE, special.chat_template)
