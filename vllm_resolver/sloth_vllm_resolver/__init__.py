"""sloth-daemon's LoRA resolver for vLLM: a vLLM on another host (no shared disk) loads the daemon's adapters by name.

Install it into the vLLM server's own venv (`pip install ./vllm_resolver` from the sloth-daemon repo) and start vLLM
with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and:
- `SLOTH_ADAPTER_URL`: the daemon's HTTP base URL (e.g. `http://gpu-box:8000`); unset = the plugin does nothing;
- `SLOTH_ADAPTER_API_KEY`: the daemon's `api_key`, if it has one (sent as `Authorization: Bearer`);
- `SLOTH_ADAPTER_CACHE`: the folder adapters are fetched into (default `~/.cache/sloth-vllm-adapters`);
- `SLOTH_ADAPTER_CACHE_KEEP`: how many fetched versions stay in it (default 8; the oldest used go first).

How it works (vLLM's own extension points): a `vllm.general_plugins` entry point registers a `LoRAResolver`
(`vllm.lora.resolver`). When a request names a model vLLM does not know and runtime LoRA updating is on, vLLM asks
its resolvers. The daemon (`vllm.adapter_loading = "resolver"`) names each load `<version>-<suffix>`, a name never
used before; this resolver takes the version from it (`v` and six digits; any other name is not ours: None, the next
resolver is asked), reads `GET <url>/sloth/adapters/<version>/files` (each file's name, size and sha256, and a digest
of them all), and downloads each file (`.../files/<name>`) into `<cache>/<version>-<digest[:16]>/` (written beside
it under a temporary name, each file's size and sha256 checked, then renamed into place: a half-fetched adapter is
never loaded). A version already in the cache with the same digest is not fetched again. vLLM loads the folder and
keeps the name until the daemon unloads it (`/v1/unload_lora_adapter`), exactly as with a path.
Errors (daemon unreachable, 401/404, a hash mismatch) are logged and the name stays unresolved: vLLM answers the
request 404, which the daemon's probe reports as the reason the adapter is not served.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("sloth_vllm_resolver")

NAME_RE = re.compile(r"^(v\d{6})-[0-9A-Za-z]+$")
CHUNK = 1 << 20


class FetchError(RuntimeError):
    """The adapter's files could not be fetched or did not match their manifest."""


def version_of(lora_name: str) -> str | None:
    """The daemon's adapter version in a load name (`v000012-ab12cd3` -> `v000012`), or None."""
    m = NAME_RE.match(lora_name)
    return m.group(1) if m else None


async def fetch_adapter(client, version: str, cache: Path, keep: int = 8) -> Path:
    """Fetch `version`'s files into `cache` (see the module docstring) and return its folder.
    `client`: an `httpx.AsyncClient` with the daemon's base URL and key. Raises FetchError."""
    r = await client.get(f"/sloth/adapters/{version}/files")
    if r.status_code != 200:
        raise FetchError(f"{version}: the daemon answered {r.status_code}: {r.text[:300]}")
    manifest = r.json()
    folder = cache / f"{version}-{manifest['digest'][:16]}"
    if (folder / "adapter_config.json").exists():
        os.utime(folder)  # used now: the last to be pruned
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=cache))
    try:
        for entry in manifest["files"]:
            name = entry["name"]
            if "/" in name or name in ("", ".", ".."):
                raise FetchError(f"{version}: refused file name {name!r}")
            h, size = hashlib.sha256(), 0
            async with client.stream("GET", f"/sloth/adapters/{version}/files/{name}") as resp:
                if resp.status_code != 200:
                    raise FetchError(f"{version}/{name}: the daemon answered {resp.status_code}")
                with open(tmp / name, "wb") as f:
                    async for chunk in resp.aiter_bytes(CHUNK):
                        f.write(chunk)
                        h.update(chunk)
                        size += len(chunk)
            if size != entry["bytes"] or h.hexdigest() != entry["sha256"]:
                raise FetchError(f"{version}/{name}: got {size} bytes with another sha256 than the manifest's")
        try:
            os.rename(tmp, folder)
        except OSError:  # fetched meanwhile by another resolve of the same version: use that one
            if not (folder / "adapter_config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prune(cache, keep, folder)
    return folder


def prune(cache: Path, keep: int, current: Path) -> None:
    """Keep the `keep` most recently used fetched versions (and `current`), remove the rest."""
    folders = sorted((p for p in cache.iterdir() if p.is_dir() and NAME_RE.match(p.name)),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in folders[max(keep, 1):]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def make_resolver(url: str, api_key: str | None, cache: Path, keep: int):
    """The resolver instance (a `vllm.lora.resolver.LoRAResolver`)."""
    import httpx
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    class SlothDaemonResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            version = version_of(lora_name)
            if version is None:
                return None
            started = time.monotonic()
            try:
                async with httpx.AsyncClient(base_url=url, headers=headers,
                                             timeout=httpx.Timeout(300, connect=10)) as client:
                    folder = await fetch_adapter(client, version, cache, keep)
            except (FetchError, httpx.HTTPError, OSError, KeyError, ValueError) as e:
                log.error("sloth-daemon adapter %s (%s) not fetched from %s: %s", lora_name, version, url, e)
                return None
            log.info("sloth-daemon adapter %s: %s ready in %s (%.2f s)", lora_name, version, folder,
                     time.monotonic() - started)
            # vLLM sets the int id itself (resolve_lora in vllm/entrypoints/openai/models/serving.py).
            return LoRARequest(lora_name=lora_name, lora_int_id=abs(hash(lora_name)) or 1, lora_path=str(folder))

    return SlothDaemonResolver()


def register() -> None:
    """vLLM's `vllm.general_plugins` entry point: register the resolver when `SLOTH_ADAPTER_URL` is set."""
    url = os.environ.get("SLOTH_ADAPTER_URL", "").strip()
    if not url:
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    cache = Path(os.environ.get("SLOTH_ADAPTER_CACHE") or Path.home() / ".cache" / "sloth-vllm-adapters")
    keep = int(os.environ.get("SLOTH_ADAPTER_CACHE_KEEP", "8"))
    LoRAResolverRegistry.register_resolver(
        "sloth-daemon", make_resolver(url.rstrip("/"), os.environ.get("SLOTH_ADAPTER_API_KEY"), cache, keep))

