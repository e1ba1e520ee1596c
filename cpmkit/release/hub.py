"""``cpmkit release --push``: upload each artifact folder to its own Hugging Face repo.

One repo per artifact, named like the folder: ``ORG/<name>-Q4_K_M-GGUF`` (as ggml-org's GGUF-my-repo names
single-quant repos) and ``ORG/<name>-4bit-g64-MLX`` (an MLX model is a whole folder, so the community keeps
one repo per quantization, as mlx-community does). Every precondition (the client library, a token, a
reachable Hub that accepts the token) is checked before the release writes anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cpmkit.errors import CpmkitError

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class HubDestination:
    org: str
    name: str | None  # the NAME of ORG/NAME: the base of every repo name
    token: str


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def check_push(spec: str) -> HubDestination:
    """``ORG`` or ``ORG/NAME`` -> where to push; CpmkitError when pushing cannot work from here."""
    org, _, name = spec.partition("/")
    if not _PART.fullmatch(org) or (name and not _PART.fullmatch(name)):
        raise CpmkitError(f"--push {spec}: expected ORG or ORG/NAME (letters, digits, '.', '_', '-')")
    try:
        from huggingface_hub import HfApi, constants, get_token
    except ImportError:
        raise CpmkitError("--push needs huggingface_hub (pip install 'cpmkit[hub]'); nothing was written") from None
    if constants.HF_HUB_OFFLINE:
        raise CpmkitError("--push: the Hugging Face Hub is switched off here (HF_HUB_OFFLINE is set); nothing was "
                          "written")
    token = get_token()
    if not token:
        raise CpmkitError("--push: no Hugging Face token (set HF_TOKEN or run `hf auth login`); nothing was written")
    try:
        HfApi(token=token).whoami()
    except Exception as e:  # offline, DNS, HTTP 401: the client raises many types, all mean "cannot push"
        raise CpmkitError(f"--push: cannot reach the Hugging Face Hub with this token ({_first_line(e)}); "
                          "nothing was written") from None
    return HubDestination(org, name or None, token)


def upload_folder(hub: HubDestination, folder: Path, repo_id: str, message: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=hub.token)
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    except Exception as e:  # the hub client raises many types; the folder stays complete locally either way
        raise CpmkitError(f"{folder}: upload to {repo_id} failed ({_first_line(e)}); re-run to retry") from None
