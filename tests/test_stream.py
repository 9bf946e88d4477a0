"""The resumable stream: partitioning, determinism, exact resume at another world size, epoch
tails, mixing, start-up errors, and LAION-scale shard lists."""

from __future__ import annotations

import collections
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import storage
from data_pipeline.config import DataConfig
from data_pipeline.images import image_loader
from data_pipeline.shards import ShardWriter, make_manifest
from data_pipeline.sources import DataError, open_sources
from data_pipeline.stream import SourceProgress, StreamingLoader, merge_states, slot_shards
from tests.datasets import make_dataset


def cfg(url: str, **kw) -> DataConfig:
    kw.setdefault("shuffle_buffer", 32)
    return DataConfig(url=url, resolution=8, **kw)


def take(loader, n_batches=None):
    """(epoch, key) pairs of the first ``n_batches`` batches (all, for a finite stream)."""
    out = []
    for i, batch in enumerate(loader):
        assert batch["image"].shape[1:] == (3, 8, 8)
        out += zip(batch["epoch"].tolist(), batch["key"])
        if n_batches is not None and i + 1 == n_batches:
            break
    return out


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """12 shards of uneven sizes (143 samples)."""
    root = str(tmp_path_factory.mktemp("uneven"))
    keys = make_dataset(root, [5, 17, 9, 14, 3, 20, 11, 8, 16, 12, 6, 22])
    return root, keys


def test_one_pass_delivers_every_sample_once(uneven):
    root, keys = uneven
    got = take(image_loader(cfg(root), 10, num_workers=2, max_epochs=1))
    assert sorted(k for _, k in got) == sorted(keys)
    assert {e for e, _ in got} == {0}


def test_workers_survive_the_job_stop_signals(uneven):
    """Slurm signals every process of a job step, loader workers too: they must not die of the
    SIGTERM/SIGUSR2 that asks the main process to checkpoint; the stream goes on unchanged."""
    import multiprocessing
    import os
    import signal

    root, keys = uneven
    got = []
    for i, batch in enumerate(image_loader(cfg(root), 10, num_workers=2, max_epochs=1)):
        got += batch["key"]
        if i == 1:
            workers = multiprocessing.active_children()
            assert len(workers) == 2
            for w in workers:
                for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
                    os.kill(w.pid, sig)
    assert sorted(got) == sorted(keys)                     # nothing lost, no worker died
    assert all(not w.is_alive() for w in workers)          # and they still shut down in order


def test_ranks_and_workers_are_disjoint_and_cover_the_dataset(uneven):
    root, keys = uneven
    per_rank = [take(image_loader(cfg(root), 7, rank=r, world_size=2, num_workers=2, max_epochs=1))
                for r in range(2)]
    a, b = ({k for _, k in p} for p in per_rank)
    assert not a & b
    assert sorted(a | b) == sorted(keys)
    assert sum(len(p) for p in per_rank) == len(keys)


def test_same_config_same_stream(uneven):
    root, _ = uneven
    first = take(image_loader(cfg(root), 8, seed=3, num_workers=2), 12)
    second = take(image_loader(cfg(root), 8, seed=3, num_workers=2), 12)
    other_seed = take(image_loader(cfg(root), 8, seed=4, num_workers=2), 12)
    assert first == second
    assert first != other_seed


def test_endless_stream_gives_full_equal_batches_on_every_rank(uneven):
    root, keys = uneven
    steps = 3 * len(keys) // (2 * 6)  # about three epochs on 2 ranks
    for r in range(2):
        sizes = [len(b["key"]) for _, b in zip(range(steps), image_loader(cfg(root), 6, rank=r, world_size=2,
                                                                           num_workers=2))]
        assert sizes == [6] * steps


def _phase(root, world, workers, batches, state=None, batch=8, **kw):
    loaders, seen = [], []
    for r in range(world):
        loader = image_loader(cfg(root, **kw), batch, rank=r, world_size=world, num_workers=workers,
                              max_epochs=None if batches else 1)
        if state is not None:
            loader.load_state_dict(state)
        seen += take(loader, batches)
        loaders.append(loader)
    base = loaders[0]._base
    merged = merge_states(base, [loader.local_delta() for loader in loaders])
    return seen, json.loads(json.dumps(merged))  # the state must survive a JSON checkpoint


@pytest.mark.parametrize("first,second", [((2, 2), (3, 1)), ((1, 0), (2, 2)), ((3, 1), (1, 2))])
def test_resume_on_another_world_size_is_exact(uneven, first, second):
    root, keys = uneven
    seen1, state = _phase(root, *first, batches=3, shuffle_buffer=40)
    assert state["samples"] == len(seen1)
    seen2, _ = _phase(root, *second, batches=None, state=state)
    epoch0 = [k for e, k in seen1 + seen2 if e == 0]
    assert len(epoch0) == len(set(epoch0)), "a sample was repeated"
    assert sorted(epoch0) == sorted(keys), "a sample was dropped"


def test_resume_across_epoch_boundaries_is_exact(uneven):
    root, keys = uneven
    seen1, state = _phase(root, 2, 2, batches=13, batch=6)       # 156 > 143 samples: into epoch 1
    assert max(e for e, _ in seen1) >= 1
    loaders = []
    seen2 = []
    for r in range(3):
        loader = image_loader(cfg(root), 5, rank=r, world_size=3, num_workers=1, max_epochs=2)
        loader.load_state_dict(state)
        seen2 += take(loader)
        loaders.append(loader)
    first_epoch = state["sources"][0]["first_epoch"]
    counts = collections.Counter(seen1 + seen2)
    for epoch in range(first_epoch + 1):
        got = sorted(k for (e, k), c in counts.items() if e == epoch for _ in range(c))
        assert got == sorted(keys), f"epoch {epoch} not exact"


def test_state_counts_defects_and_samples(uneven):
    root, _ = uneven
    loader = image_loader(cfg(root), 4, num_workers=2)
    take(loader, 5)
    state = loader.state_dict()
    assert state["samples"] == 20 == loader.samples_seen
    loader2 = image_loader(cfg(root), 4, num_workers=1)
    loader2.load_state_dict(state)
    take(loader2, 2)
    assert loader2.samples_seen == 28


def test_iterating_again_continues(uneven):
    root, keys = uneven
    loader = image_loader(cfg(root), 9, num_workers=2, max_epochs=1)
    a = take(loader, 4)
    b = take(loader)
    assert sorted(k for _, k in a + b) == sorted(keys)


def test_state_for_another_dataset_is_refused(uneven, tmp_path):
    root, _ = uneven
    state = image_loader(cfg(root), 4).state_dict()
    other = str(tmp_path / "other")
    make_dataset(other, [3] * 12)
    with pytest.raises(DataError, match="different shard list"):
        image_loader(cfg(other), 4).load_state_dict(state)


def test_mixture_follows_weights(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_dataset(a, [40] * 4, prefix="a")
    make_dataset(b, [40] * 4, prefix="b")
    got = take(image_loader(cfg(f"{a}::0.8,{b}::0.2"), 20, num_workers=2), 25)
    frac = sum(k.startswith("a") for _, k in got) / len(got)
    assert 0.72 < frac < 0.88, frac


def test_no_shards_and_too_few_shards_are_clear_errors(tmp_path, uneven):
    with pytest.raises(DataError, match="no shards found"):
        image_loader(cfg(str(tmp_path / "empty")), 4)
    root, _ = uneven
    with pytest.raises(DataError, match="12 shards but 4 ranks x 4 workers"):
        image_loader(cfg(root), 4, rank=0, world_size=4, num_workers=4)
    with pytest.raises(DataError, match="bad mixture weight"):
        image_loader(cfg(f"{root}::heavy"), 4)


def test_brace_patterns_expand_without_listing(uneven, monkeypatch):
    root, keys = uneven
    names = sorted(n for n in storage.listdir(root) if n.endswith(".tar"))
    monkeypatch.setattr(storage, "listdir", lambda *_: pytest.fail("listed a folder"))
    monkeypatch.setattr(storage, "glob", lambda *_: pytest.fail("globbed a folder"))
    url = f"{root}/{{{','.join(n[:-4] for n in names)}}}.tar"
    got = take(image_loader(cfg(url), 10, num_workers=2, max_epochs=1))
    assert sorted(k for _, k in got) == sorted(keys)


def test_laion_scale_manifest_opens_without_listing(tmp_path, monkeypatch):
    n = 100_000
    manifest = {"shards": [{"name": f"laion-{i:06d}.tar", "samples": 10_000, "bytes": 1 << 28, "sha256": ""}
                           for i in range(n)], "samples": n * 10_000}
    storage.write_json(str(tmp_path / "manifest.json"), manifest, indent=None)
    monkeypatch.setattr(storage, "listdir", lambda *_: pytest.fail("listed a bucket"))
    monkeypatch.setattr(storage, "glob", lambda *_: pytest.fail("globbed a bucket"))
    [source] = open_sources(str(tmp_path))
    assert len(source.shards) == n and source.total_samples == n * 10_000
    # 256 ranks x 8 workers: every reader slot gets a disjoint share of every epoch.
    loader = image_loader(cfg(str(tmp_path)), 64, rank=255, world_size=256, num_workers=8)
    assert loader.steps_per_epoch == n * 10_000 // (64 * 256)
    progress = SourceProgress(n)
    slots = [slot_shards(progress, 0, 0, 0, s, 2048) for s in (0, 1, 2047)]
    assert [len(s) for s in slots] == [49, 49, 48]
    assert not set(x[0] for x in slots[0]) & set(x[0] for x in slots[1])
    # Half an epoch consumed and 2048 partial shards: the state stays small.
    for s in range(0, n, 2):
        progress.epoch(0).mark_done(s)
    for s in range(1, 4096, 2):
        progress.epoch(0).mark_partial(s, 500, frozenset(range(480, 500)))
    text = json.dumps(progress.to_json())
    assert len(text) < 1_000_000
    back = SourceProgress.from_json(json.loads(text))
    assert back.consumed(0, 2, 9_999) and back.consumed(0, 1, 10) and not back.consumed(0, 1, 490)
    assert len(slot_shards(back, 0, 0, 0, 0, 1)) == n // 2


def test_loader_state_is_a_collective_across_real_processes(tmp_path, uneven):
    """Two real processes on gloo: state_dict() gathers both ranks' progress."""
    import os
    import subprocess
    import sys

    root, keys = uneven
    script = tmp_path / "ranks.py"
    script.write_text(f"""
import json, os, torch.distributed as dist
from data_pipeline.config import DataConfig
from data_pipeline.images import image_loader
from data_pipeline.shards import ShardWriter, make_manifest
dist.init_process_group("gloo")
loader = image_loader(DataConfig(url={root!r}, resolution=8, shuffle_buffer=16), 5, num_workers=2)
seen = []
for i, b in enumerate(loader):
    seen += list(zip(b["epoch"].tolist(), b["key"]))
    if i == 2:
        break
state = loader.state_dict()
with open(os.path.join({str(tmp_path)!r}, f"rank{{dist.get_rank()}}.json"), "w") as f:
    json.dump({{"seen": seen, "state": state}}, f)
dist.destroy_process_group()
""")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
                           str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert out[0]["state"] == out[1]["state"]
    state = out[0]["state"]
    seen1 = [tuple(x) for o in out for x in o["seen"]]
    assert state["samples"] == len(seen1) == 30
    rest = take(_resumed(root, state))
    epoch0 = [k for e, k in seen1 + rest if e == 0]
    assert sorted(epoch0) == sorted(keys)


def _resumed(root, state):
    loader = image_loader(cfg(root), 7, num_workers=2, max_epochs=1)
    loader.load_state_dict(state)
    return loader


def test_streaming_loader_rejects_bad_state_version(uneven):
    root, _ = uneven
    loader = image_loader(cfg(root), 4)
    with pytest.raises(DataError, match="version"):
        loader.load_state_dict({"version": 99, "sources": []})
    assert isinstance(loader, StreamingLoader)


# ------------------------------------------------------------------ exact order on the same layout


def _wide_image(i: int) -> bytes:
    """20x12: resized to 13x8 for resolution 8, so the random crop draws from the stream's RNG."""
    arr = np.random.default_rng(i).integers(0, 255, size=(12, 20, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _make_wide(root: str, sizes: list[int], prefix: str) -> None:
    shards, n = [], 0
    for j, size in enumerate(sizes):
        w = ShardWriter(root, prefix=f"{prefix}{j:03d}", max_samples=10**9, write_manifest=False)
        for _ in range(size):
            w.write(f"{prefix}{n:05d}", {"png": _wide_image(n), "cls": str(n % 5).encode(),
                                         "json": json.dumps({"width": 20, "height": 12}).encode()})
            n += 1
        w.close()
        shards += w.shards
    storage.write_json(storage.join(root, "manifest.json"), make_manifest(shards))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Two datasets of non-square images: 6 shards (44 samples) and 4 shards (23 samples)."""
    a, b = str(tmp_path_factory.mktemp("wide_a")), str(tmp_path_factory.mktemp("wide_b"))
    _make_wide(a, [7, 9, 5, 11, 8, 4], "a")
    _make_wide(b, [6, 3, 8, 6], "b")
    return a, b


def _loaders(url, world, workers, state=None, **kw):
    kw = {"shuffle_buffer": 12, "interleave": 3, **kw}
    max_epochs = kw.pop("max_epochs", None)
    out = []
    for r in range(world):
        loader = image_loader(cfg(url, **kw), 5, seed=7, rank=r, world_size=world,
                              num_workers=workers, max_epochs=max_epochs)
        if state is not None:
            loader.load_state_dict(state)
        out.append(loader)
    return out


def _batches(loader, n=None):
    out = []
    for b in loader:
        out.append({"key": b["key"], "epoch": b["epoch"].tolist(), "label": b["label"].tolist(),
                    "image": b["image"].clone()})
        if len(out) == n:
            break
    return out


def _assert_same(got, want):
    assert [b["key"] for b in got] == [b["key"] for b in want]
    for g, w in zip(got, want):
        assert g["epoch"] == w["epoch"] and g["label"] == w["label"]
        assert torch.equal(g["image"], w["image"]), g["key"]


def _save(loaders):
    state = merge_states(loaders[0]._base, [lo.local_delta() for lo in loaders])
    return json.loads(json.dumps(state))  # as the Trainer's checkpoint holds it


def _first(url, world, workers, n, state=None, **kw):
    """Every rank's first ``n`` batches, and the loaders (to save their state)."""
    loaders = _loaders(url, world, workers, state, **kw)
    return loaders, [_batches(lo, n) for lo in loaders]


def _exact_resume(url, world, workers, n, m, state=None, **kw):
    """Each rank's batches n+1..n+m of a run, and its m batches after a save at batch n and a
    resume on the same layout; and the saved state."""
    full = [_batches(lo, n + m)[n:] for lo in _loaders(url, world, workers, state, **kw)]
    saved = _save(_first(url, world, workers, n, state, **kw)[0])
    assert len(saved["exact"]["slots"]) == world * max(1, workers)
    resumed = [_batches(lo, m) for lo in _loaders(url, world, workers, saved, **kw)]
    return full, resumed, saved


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("world,workers,n,m,mixture", [
    (1, 0, 7, 6, False),   # 44 samples: batch 9 crosses into epoch 1
    (1, 2, 5, 8, True),    # 5 batches from 2 workers: worker 1 serves the next
    (1, 2, 1, 9, False),   # worker 1 had delivered nothing: it starts as it would have
    (2, 1, 3, 5, True),
    (1, 3, 5, 5, False),
])
def test_resume_on_the_same_layout_gives_the_same_batches(wide, world, workers, n, m, mixture):
    url = f"{wide[0]}::0.6,{wide[1]}::0.4" if mixture else wide[0]
    full, resumed, _ = _exact_resume(url, world, workers, n, m)
    for want, got in zip(full, resumed):
        _assert_same(got, want)
    assert any(e >= 1 for rank in full for b in rank for e in b["epoch"]), "no epoch boundary"


def test_exact_resume_after_a_resume_on_another_layout(wide):
    """A deal made from a state with progress travels in the records (their plan), so the next
    resume on that layout is exact too; and so is a resume of a resume."""
    url, kw = wide[0], {"interleave": 1, "shuffle_buffer": 4}   # the deal lasts a while
    start = _save(_first(url, 1, 0, 4, **kw)[0])
    assert start["sources"][0]["epochs"]["0"]["done"] != "AA=="  # the deal is not a fresh one
    full, resumed, saved = _exact_resume(url, 2, 1, 1, 6, state=start, **kw)
    for want, got in zip(full, resumed):
        _assert_same(got, want)
    assert any(rec["sources"][0]["plan"].get("0") for rec in saved["exact"]["slots"].values())
    full2 = [_batches(lo, 3 + 4)[3:] for lo in _loaders(url, 2, 1, saved, **kw)]
    again = _save(_first(url, 2, 1, 3, saved, **kw)[0])
    for want, lo in zip(full2, _loaders(url, 2, 1, again, **kw)):
        _assert_same(_batches(lo, 4), want)


def test_exact_resume_of_a_finite_stream(wide, tmp_path):
    """Workers that ended before the save stay ended; the others finish in the same order."""
    lopsided = str(tmp_path / "lopsided")
    _make_wide(lopsided, [30, 2, 2, 2], "c")   # one worker ends long before the other
    cases = [(f"{wide[0]}::0.5,{wide[1]}::0.5", 44 + 23, 7), (lopsided, 36, 2), (lopsided, 36, 4)]
    ended = 0
    for url, total, n in cases:
        full, resumed, saved = _exact_resume(url, 1, 2, n, 10**6, max_epochs=1)
        _assert_same(resumed[0], full[0])
        keys = [k for b in _first(url, 1, 2, n, max_epochs=1)[1][0] + resumed[0] for k in b["key"]]
        assert len(keys) == len(set(keys)) == total
        ended += any(rec["finished"] for rec in saved["exact"]["slots"].values())
    assert ended


def test_iterating_again_continues_in_the_same_order(wide):
    (loader,) = _loaders(wide[0], 1, 2)
    a, b = _batches(loader, 3), _batches(loader, 4)
    _assert_same(a + b, _batches(_loaders(wide[0], 1, 2)[0], 7))


def test_other_layout_after_exact_resumes_is_exact_as_a_set(wide):
    """Records of one layout are not used on another: a re-deal after exact resumes still
    delivers every sample of the epoch once."""
    url = wide[0]
    loaders, got = _first(url, 1, 2, 5)
    loaders, got2 = _first(url, 1, 2, 4, _save(loaders))    # an exact resume, saved again...
    state = _save(loaders)
    assert state["exact"]["layout"]["workers"] == 2
    rest = []
    for r in range(3):                                      # ...then 3 ranks x 1 worker: a re-deal
        lo = image_loader(cfg(url, shuffle_buffer=12, interleave=3), 5, seed=7, rank=r,
                          world_size=3, num_workers=1, max_epochs=1)
        lo.load_state_dict(state)
        rest += _batches(lo)
    epoch0 = [k for b in got[0] + got2[0] + rest for e, k in zip(b["epoch"], b["key"]) if e == 0]
    assert len(epoch0) == len(set(epoch0)) == 44


def test_batches_reach_the_model_channels_last_and_convolutions_keep_it(uneven):
    """``data.channels_last`` (the default): the float batch is NHWC in memory, with the same values
    as the NCHW-contiguous batch of ``channels_last=False``, and a convolutional tokenizer given it
    computes channels-last through its conv and norm layers (its weights stay NCHW, as DeepSpeed's
    flat buffers leave them)."""
    from model_zoo.registry import create_model

    root, _ = uneven
    nhwc = next(iter(image_loader(cfg(root), 4, num_workers=1, max_epochs=1)))["image"]
    nchw = next(iter(image_loader(cfg(root, channels_last=False), 4, num_workers=1, max_epochs=1)))["image"]
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()
    assert nchw.is_contiguous() and torch.equal(nhwc, nchw)
    torch.manual_seed(0)
    model = create_model("vqgan-f8-tiny")
    x = torch.nn.functional.interpolate(nhwc, size=model.image_size)
    assert x.is_contiguous(memory_format=torch.channels_last)
    layouts = collections.Counter()

    def record(mod, _inp, out):
        if out.shape[-2:] != (1, 1) and out.shape[1] > 1:      # both layouts at once: not telling
            layouts[type(mod).__name__, out.is_contiguous(memory_format=torch.channels_last)] += 1

    for mod in model.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.GroupNorm)):
            mod.register_forward_hook(record)
    model(x)
    # (an NCHW input leaves the encoder's 39 conv and norm outputs NCHW; the decoder's input comes
    # from the quantizer's NHWC codes, so it runs channels-last either way)
    assert layouts and all(cl for (_, cl) in layouts), layouts


def test_small_tensors_leave_workers_by_value_and_come_back_equal():
    """Workers send small contiguous tensors inside the pickle (no shared-memory descriptor to
    fetch per tensor); the main process rebuilds them bit for bit, any dtype and shape. Images
    (NHWC-strided) and large tensors keep the shared-memory path."""
    import pickle

    from data_pipeline.stream import BY_VALUE_MAX_BYTES, _by_value, _unwrap

    small = {"codes": torch.randint(0, 1 << 40, (8, 1024)), "label": torch.tensor([3, -1]),
             "flags": torch.tensor([True, False]), "emb": torch.randn(2, 3).bfloat16(), "scalar": torch.tensor(2.5),
             "empty": torch.zeros(0, 4)}
    big = {"image": torch.zeros(2, 64, 64, 3, dtype=torch.uint8).permute(0, 3, 1, 2),
           "text_embedding": torch.zeros(BY_VALUE_MAX_BYTES // 4 + 1)}
    sent = _by_value({**small, **big, "key": ["a", "b"]})
    assert all(sent[k] is v for k, v in big.items()) and sent["key"] == ["a", "b"]
    got = _unwrap(pickle.loads(pickle.dumps(sent)))
    for k, v in small.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    got["codes"][0, 0] = 7                                   # a writable tensor of its own


def test_two_workers_deliver_the_same_batches_as_none(uneven):
    root, _ = uneven
    ref = list(image_loader(cfg(root), 5, num_workers=0, max_epochs=1))
    got = list(image_loader(cfg(root), 5, num_workers=1, max_epochs=1))
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert a["key"] == b["key"]
        for k in ("image", "label", "epoch"):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
