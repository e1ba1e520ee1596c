"""A checkpoint's tokenizer: ``tokenizer.json`` (Hugging Face tokenizers) or ``tokenizer.model``
(SentencePiece), its special tokens, BOS policy and chat template, read from the files a MiniCPM repo ships.

Text is encoded without the backend's own special-token handling; BOS is prepended here, following
``add_bos_token`` in tokenizer_config.json (SentencePiece llama vocabularies default to adding it), so
both backends give the same ids and llama-perplexity's "BOS then text" convention is easy to follow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpmkit.errors import CpmkitError
from cpmkit.jsonfile import read_json_object


@dataclass(frozen=True)
class SpecialTokens:
    bos_id: int | None
    eos_ids: tuple[int, ...]
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    added: dict[int, str] = field(default_factory=dict)  # added/control tokens by id


class Tokenizer:
    def __init__(self, root: Path, model_config: dict[str, Any] | None = None):
        self.root = root
        self.config = read_json_object(root / "tokenizer_config.json", required=False)
        self.json_path = root / "tokenizer.json"
        self.sp_path = root / "tokenizer.model"
        if self.json_path.is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._hf = HFTokenizer.from_file(str(self.json_path))
            except Exception as e:  # the Rust binding raises its own exception type
                raise CpmkitError(f"{self.json_path}: not a readable tokenizer ({e})") from None
            self._sp = None
        elif self.sp_path.is_file():
            import sentencepiece as spm

            self._hf = None
            self._sp = spm.SentencePieceProcessor()
            if not self._sp.Load(str(self.sp_path)):
                raise CpmkitError(f"{self.sp_path}: not a readable SentencePiece model")
        else:
            raise CpmkitError(f"{root}: no tokenizer.json or tokenizer.model")
        self.special = self._special_tokens(model_config or {})

    @property
    def kind(self) -> str:
        return "tokenizers" if self._hf is not None else "sentencepiece"

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True) if self._hf else self._sp.GetPieceSize()

    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        jinja = self.root / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        return template

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self._hf.encode(text, add_special_tokens=False).ids if self._hf else self._sp.EncodeAsIds(text)
        bos = self.special.add_bos if add_bos is None else add_bos
        if bos and self.special.bos_id is not None:
            ids = [self.special.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=False) if self._hf else self._sp.DecodeIds(ids)

    def token_id(self, text: str) -> int | None:
        if self._hf:
            return self._hf.token_to_id(text)
        piece = self._sp.PieceToId(text)
        return None if piece == self._sp.unk_id() and text != self._sp.IdToPiece(piece) else piece

    def _special_tokens(self, model_config: dict[str, Any]) -> SpecialTokens:
        def resolve(key: str) -> int | None:
            token = self.config.get(key)
            if isinstance(token, dict):  # older tokenizer_config.json files store AddedToken dicts
                token = token.get("content")
            return self.token_id(token) if isinstance(token, str) else None

        bos = model_config.get("bos_token_id", resolve("bos_token"))
        eos = model_config.get("eos_token_id", resolve("eos_token"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        added = {int(i): t["content"] for i, t in self.config.get("added_tokens_decoder", {}).items()}
        added_json = read_json_object(self.root / "added_tokens.json", required=False)
        added.update({int(i): t for t, i in added_json.items()})
        default_bos = self._sp is not None or self._post_processor_adds_bos()
        return SpecialTokens(bos_id=bos, eos_ids=eos_ids, unk_id=resolve("unk_token"), pad_id=resolve("pad_token"),
                             add_bos=bool(self.config.get("add_bos_token", default_bos)), added=added)

    def _post_processor_adds_bos(self) -> bool:
        post = json.loads(self._hf.to_str()).get("post_processor") or {}
        return post.get("type") == "TemplateProcessing" and "SpecialToken" in (post.get("single") or [{}])[0]
