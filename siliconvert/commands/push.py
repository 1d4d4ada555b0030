"""Push a release folder to the Hugging Face Hub, as it is: checked against its SHA256SUMS first, so
what goes up is what was validated.

The token comes from where huggingface_hub looks for it (HF_TOKEN, then `hf auth login`'s cache); this
module only asks whether one exists and never prints, logs or stores it.
"""

from __future__ import annotations

from pathlib import Path

from siliconvert.commands.release import verify_checksums
from siliconvert.errors import SiliconvertError


class PushError(SiliconvertError):
    """The Hub could not be reached, refused the token or the repo, or no token is set."""


def push(release_dir: Path, repo: str, *, private: bool = False, dry_run: bool = False) -> list[str]:
    """Upload `release_dir` to the model repo `repo` (created if missing). Returns one line per file,
    "relative/path (N bytes)"; with `dry_run`, only says what would go up and touches no network."""
    release_dir = Path(release_dir)
    check_repo_id(repo)
    files = verify_checksums(release_dir)
    listing = [f"{name} ({(release_dir / name).stat().st_size:,} bytes)" for name in files]
    if not dry_run:
        upload(release_dir, repo, private)
    return listing


def repo_for(release_dir: Path, repo_prefix: str) -> str:
    """The repo a release folder goes to: the prefix's org, the folder's name (org/Name-4bit, org/Name-GGUF)."""
    return f"{repo_prefix.split('/')[0]}/{Path(release_dir).name}"


def check_repo_id(repo: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise PushError(f"not a valid Hub repo id: {str(e).splitlines()[0]}", repo) from None


def upload(release_dir: Path, repo: str, private: bool) -> None:
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    if get_token() is None:
        raise PushError("not logged in to the Hugging Face Hub: set HF_TOKEN or run `hf auth login`", repo)
    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=release_dir,
                          commit_message=f"siliconvert release {release_dir.name}")
    except HfHubHTTPError as e:
        raise PushError(refusal(e, repo), repo) from None
    except (HTTPError, ConnectionError) as e:  # transport failures, and HF_HUB_OFFLINE (a ConnectionError)
        raise PushError(f"cannot reach the Hugging Face Hub (offline?): {type(e).__name__}", repo) from None


def refusal(error, repo: str) -> str:
    """One line for an HTTP error from the Hub; the server's own words where it gave any."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if status == 401:
        return "the Hub rejected the token (HTTP 401): log in again with `hf auth login`"
    if status == 403:
        return f"the Hub refused: this token cannot write to {repo} (HTTP 403; a write token is needed)"
    detail = (getattr(error, "server_message", None) or str(error)).strip().splitlines()
    return f"the Hub refused the upload (HTTP {status}): {detail[0] if detail else type(error).__name__}"
