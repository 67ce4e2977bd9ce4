"""The Hugging Face Hub, asked the way huggingface_hub asks it, so an unreachable or offline Hub fails fast.

transformers and datasets retry a failed connection for about 50 s before they give up with "couldn't connect".
Before loading a repo id (``model.name``, an ``hf:`` question source) the stages ask the Hub once for the repo's
metadata instead (``HfApi.repo_info``: no retries, huggingface_hub's own ``HF_HUB_ETAG_TIMEOUT``, its session, so
``HF_ENDPOINT``, ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` and the user's token apply exactly as they do to the
download that follows), and they honour ``HF_HUB_OFFLINE=1`` (``huggingface_hub.is_offline_mode``) by not asking.

Used by stages/lib/models/loading.py (models) and stages/lib/questions/sources.py (datasets). Imports huggingface_hub
only.
"""

from __future__ import annotations

from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from stages.lib.errors import UserError

class HubRepoError(UserError):
    """The Hub answered, and the repo or revision does not exist, or it needs a login."""


def unreachable_reason(repo_id: str, repo_type: str = "model", revision: str | None = None,
                       endpoint: str | None = None, timeout: float | None = None) -> str | None:
    """Ask the Hub once for a repo's metadata; None when it answered, else why it could not be reached (one line).

    ``endpoint`` defaults to huggingface_hub's (``HF_ENDPOINT``), ``timeout`` to ``HF_HUB_ETAG_TIMEOUT`` seconds.
    A repo or revision the Hub reports missing (or private / gated without a token) raises ``HubRepoError``: the
    Hub is reachable, and waiting or going offline would not help.
    """
    timeout = constants.HF_HUB_ETAG_TIMEOUT if timeout is None else timeout
    try:
        HfApi(endpoint=endpoint).repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=timeout)
    except RevisionNotFoundError:
        raise HubRepoError(f"{repo_type} {repo_id!r}: the Hub has no revision {revision!r}") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise HubRepoError(f"{repo_type} {repo_id!r}: not found on the Hub, or private or gated (then log in with "
                           f"`hf auth login`)") from None
    except Exception as error:  # the transport's own errors (connection, DNS, proxy, timeout) and 5xx answers;
        # the transport is httpx in huggingface_hub 1.x and httpx2 in 2.x: either way, the Hub did not answer.
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None


def cached_file(repo_id: str, filename: str, repo_type: str = "model", revision: str | None = None) -> str | None:
    """The path of ``filename`` of a repo in the local Hugging Face cache (``HF_HUB_CACHE``), or None."""
    path = try_to_load_from_cache(repo_id, filename, revision=revision, repo_type=repo_type)
    return path if isinstance(path, str) else None  # also a sentinel object: "known not to exist"
