"""Tiny model repositories built offline: GPT-2 models, fine-tunes, PEFT LoRA adapters,
a hub cache in huggingface_hub's real layout, and a loopback hub server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch
from safetensors.torch import load_file, save_file

N_EMBD, N_LAYER, VOCAB = 32, 2, 64


def gpt2_config(**overrides: object):
    from transformers import GPT2Config

    kwargs = dict(n_embd=N_EMBD, n_layer=N_LAYER, n_head=2, vocab_size=VOCAB, n_positions=32)
    kwargs.update(overrides)
    return GPT2Config(bos_token_id=0, eos_token_id=0, pad_token_id=0, **kwargs)


def tiny_gpt2(seed: int = 0, *, classifier: bool = False, **overrides: object):
    """A randomly initialised tiny GPT-2 (LM head, or sequence classifier with 3 labels)."""
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    if classifier:
        return GPT2ForSequenceClassification(gpt2_config(num_labels=3, **overrides)).eval()
    return GPT2LMHeadModel(gpt2_config(**overrides)).eval()


def save_model(model, folder: Path, **kwargs: object) -> Path:
    """`save_pretrained` into `folder` (safetensors); returns the folder."""
    model.save_pretrained(folder, **kwargs)
    return folder


def finetuned_copy(base_folder: Path, folder: Path, seed: int, scale: float = 0.01) -> Path:
    """A copy of a saved model with every float tensor perturbed (a fake fine-tune)."""
    shutil.copytree(base_folder, folder)
    generator = torch.Generator().manual_seed(seed)
    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        for name, tensor in tensors.items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                tensors[name] = (tensor.float() + scale * noise).to(tensor.dtype)
        save_file(tensors, path, metadata={"format": "pt"})
    return folder


def single_file(folder: Path) -> Path:
    return folder / "model.safetensors"


def rewrite(path: Path, change) -> Path:
    """Load a safetensors file, apply `change(dict)` in place, save it back."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def lora_adapter(base_model, folder: Path, seed: int, **config: object):
    """A PEFT LoRA adapter on a copy of `base_model` with random A and B (so ΔW ≠ 0).

    Returns the PEFT model (for `merge_and_unload`) after saving the adapter to `folder`.
    """
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base_model), LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(folder)
    return peft_model


def merged_minus_base(peft_model, base_model) -> dict[str, torch.Tensor]:
    """PEFT's own merge, minus the base: the ground truth for ΔW (non-zero entries only)."""
    import copy

    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    base = base_model.state_dict()
    return {
        name: merged[name].float() - base[name].float()
        for name in base
        if name in merged and not torch.equal(merged[name], base[name])
    }


# -- hub ---------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install_in_hub_cache(model_folder: Path, hub_cache: Path, repo_id: str, commit: str) -> Path:
    """Place a model folder in a hub cache exactly as huggingface_hub lays it out:
    ``models--org--name/{refs/main, blobs/<sha256>, snapshots/<commit>/<file> → blob}``."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for path in sorted(model_folder.iterdir()):
        if not path.is_file():
            continue
        digest = _sha256(path)
        shutil.copyfile(path, repo / "blobs" / digest)
        link = snapshot / path.name
        link.symlink_to(os.path.relpath(repo / "blobs" / digest, snapshot))
    return snapshot


class _HubHandler(BaseHTTPRequestHandler):
    """The subset of the hub API that `snapshot_download` uses (huggingface_hub 2.4)."""

    repos: dict[str, tuple[str, Path]]  # repo id → (commit, folder)
    requests: list[str]

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, data: object) -> None:
        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _not_found(self, what: str) -> None:
        self._send(404, json.dumps({"error": what}).encode(), {"X-Error-Code": "RepoNotFound"})

    def _route(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.requests.append(f"{self.command} {path}")
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/") :]
            for repo_id, (commit, folder) in self.repos.items():
                if rest.startswith(repo_id + "/revision/"):
                    files = [{"rfilename": p.name} for p in sorted(folder.iterdir())]
                    return self._json({"id": repo_id, "sha": commit, "siblings": files})
                if rest.startswith(repo_id + "/tree/"):
                    entries = []
                    for p in sorted(folder.iterdir()):
                        digest = _sha256(p)
                        entry = {"type": "file", "oid": digest[:40], "size": p.stat().st_size}
                        entry["path"] = p.name
                        if p.suffix == ".safetensors":
                            entry["lfs"] = {
                                "oid": digest,
                                "size": p.stat().st_size,
                                "pointerSize": 130,
                            }
                        entries.append(entry)
                    return self._json(entries)
            return self._not_found(rest)
        for repo_id, (commit, folder) in self.repos.items():
            prefix = f"/{repo_id}/resolve/"
            if path.startswith(prefix):
                _, _, filename = path[len(prefix) :].partition("/")
                file = folder / filename
                if not file.is_file():
                    return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
                body = file.read_bytes()
                headers = {"X-Repo-Commit": commit, "ETag": f'"{_sha256(file)}"'}
                return self._send(200, body, headers, head)
        return self._not_found(path)

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)


@contextmanager
def loopback_hub(repos: dict[str, tuple[str, Path]]) -> Iterator[tuple[str, list[str]]]:
    """Serve `repos` (id → (commit, folder)) on 127.0.0.1; yields (endpoint, request log)."""
    log: list[str] = []
    handler = type("Handler", (_HubHandler,), {"repos": repos, "requests": log})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()
