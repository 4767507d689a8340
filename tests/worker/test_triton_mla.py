"""The Triton MLA attention kernels (absorbed over the paged cache; multi-head form of long chunks) under
TRITON_INTERPRET=1 against the torch references.

The interpreter must be chosen before triton is first imported, so the kernels run in a child process (this file
run as a script) that reports its measurements as JSON; the tests below judge them. The error measure is
max|out - ref| / max|ref| over one sequence's rows, against a float64 softmax over its whole context and against
`attend_absorbed` / `attend_decompressed` (the torch tiles the CPU runs). The absorbed kernel's output buffer is
NaN-poisoned first. Sizes are tiny-k2's (4 heads, c 64, r 16, nope 32, v 32) plus one odd shape (3 heads, c 48)
that exercises the kernels' masks. The interpreter has no bf16 (numpy has none): the gpu-marked tests at the end
run bf16 and fp32 at K2's dims on CUDA (bench/gpu_check.sh).
"""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

# (start, new tokens) per sequence of one launch: an odd prompt, a decode mid-block, a prefix-cache hit mid-block,
# a chunk starting and ending on block boundaries, a first token, a long chunk over many key tiles.
SEQS = [(0, 37), (33, 1), (21, 50), (32, 16), (0, 1), (130, 23)]
# name -> (heads, c, r, page, tiles: None for `MLATiles.for_shape`, else (block_q, block_h, block_n))
SHAPES: dict[str, tuple[int, int, int, int, tuple[int, int, int] | None]] = {
    "tiny_default": (4, 64, 16, 16, None),  # key tiles of 64 span 4 pages
    "tiny_page_spans_tiles": (4, 64, 16, 64, (2, 8, 16)),  # one page spans 4 key tiles; half the heads masked
    "odd_dims": (3, 48, 16, 16, (4, 2, 32)),  # c not a power of two, heads not a multiple of block_h
}
DTYPES = {"float32": 1e-5, "float16": 2e-3}  # max relative error against the float64 reference
# On a GPU, at K2's dims: 64 heads on one rank (16 per program), an 8-rank shard's 8 (2 queries per program).
GPU_SHAPES: dict[str, tuple[int, int, int, int, tuple[int, int, int] | None]] = {
    "k2": (64, 512, 64, 16, None), "k2_tp8": (8, 512, 64, 64, None),
}
GPU_DTYPES = {"bfloat16": 2e-2, "float32": 1e-5}
GPU_SEQS = [(0, 1000), (4097, 1), (300, 77), (20011, 1), (2048, 512), (1003, 40)]
# The multi-head form: name -> (heads, c, r, nope, v, tiles: None for `ExpandedTiles.for_shape`, else
# (block_m, block_n, key_tile)), one chunk per (start, new tokens).
EXPANDED_SHAPES: dict[str, tuple[int, int, int, int, int, tuple[int, int, int] | None]] = {
    "tiny": (4, 64, 16, 32, 32, (16, 16, 48)),  # key tiles of 3 inner steps, ending mid-query-tile
    "odd_dims": (3, 48, 16, 24, 20, (32, 32, 32)),  # no power of two among c, nope, v
}
EXPANDED_SEQS = [(0, 37), (21, 50), (130, 23), (33, 1)]
GPU_EXPANDED_SHAPES = {"k2": (64, 512, 64, 128, 128, None)}  # c, r, nope, v of K2
GPU_EXPANDED_SEQS = [(0, 1000), (300, 777), (4096, 1024)]
SCALE = 0.15
REPO = Path(__file__).resolve().parents[2]


def _reference(q: Any, keys: Any, start: int, c: int) -> Any:
    """float64 softmax over the whole context: q [n, H, c + r], keys [ctx, c + r] -> attended latents [n, H, c]."""
    import torch

    scores = torch.einsum("nhd,kd->nhk", q, keys) * SCALE  # [n, H, ctx]
    future = torch.arange(keys.shape[0], device=q.device)[None, :] > \
        (start + torch.arange(q.shape[0], device=q.device))[:, None]  # [n, ctx]
    return torch.einsum("nhk,kc->nhc", scores.masked_fill(future[:, None], float("-inf")).softmax(-1), keys[:, :c])


def _launch_case(shape: str, dtype_name: str, lengths: list[tuple[int, int]] = SEQS, device: str = "cpu"
                 ) -> dict[str, Any]:
    """One launch over sequences of `lengths` (start, new tokens), each sequence's rows measured against the
    float64 softmax and the torch tiles, relaunched alone, and the last one relaunched in two chunks."""
    import torch

    from k2serve.worker.kernels.triton_mla import MLATiles, paged_mla_absorbed
    from k2serve.worker.model.attention_tiles import Tiles, attend_absorbed
    from k2serve.worker.model.batch import ForwardBatch, SeqSlice

    heads, c, r, page, custom = {**SHAPES, **GPU_SHAPES}[shape]
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape}|{dtype_name}".encode()))
    blocks_needed = [-(-(start + n) // page) for start, n in lengths]
    num_blocks = sum(blocks_needed) + 5
    cache = torch.randn(num_blocks * page, c + r, generator=gen).to(device, dtype)  # [slots, c + r]
    order = torch.randperm(num_blocks, generator=gen)  # every sequence's blocks scattered, none in order
    seqs, row, used = [], 0, 0
    for (start, n), nb in zip(lengths, blocks_needed):
        table = order[used : used + nb]
        used += nb
        seqs.append(SeqSlice(row, n, start, (table[:, None] * page + torch.arange(page)).flatten()))
        row += n
    q = torch.randn(row, heads, c + r, generator=gen).to(device, dtype)  # [T, H, c + r]
    tiles = MLATiles.for_shape(heads, c) if custom is None else MLATiles(*custom)

    def launch(batch_seqs: list[SeqSlice]) -> torch.Tensor:
        batch = ForwardBatch(torch.zeros(row, dtype=torch.int64), torch.zeros(row, dtype=torch.int64), batch_seqs,
                             torch.zeros(1, dtype=torch.int64))
        plan = batch.paged_plan(page, tiles.block_q, q.device)
        out = torch.full((row, heads, c), float("nan"), dtype=dtype, device=device)
        return paged_mla_absorbed(q[..., :c], q[..., c:], cache, plan, SCALE, tiles, out)

    together = launch(seqs)
    report: dict[str, Any] = {"tiles": list(vars(tiles).values()), "nan": bool(together.isnan().any()), "seqs": []}
    for s in seqs:
        rows = slice(s.row, s.row + s.num_new)
        slots = s.slots.to(device)
        keys = cache[slots[: s.context_len]].double()  # [ctx, c + r]
        expected = _reference(q[rows].double(), keys, s.start_pos, c)  # [n, H, c]
        torch_tiles = attend_absorbed(q[rows], lambda a, b, slots=slots: cache[slots[a:b]], s.start_pos, c, SCALE,
                                      Tiles(16, 32))
        ours = together[rows].double()
        alone = launch([s])[rows]
        report["seqs"].append({
            "seq": [s.start_pos, s.num_new],
            "rel_float64": ((ours - expected).abs().max() / expected.abs().max()).item(),
            "rel_torch_tiles": ((ours - torch_tiles.double()).abs().max() / torch_tiles.abs().max()).item(),
            "alone_bitwise": bool(torch.equal(alone, together[rows])),
        })
    # The long chunk again in two chunks split off the query tiles' grid (as after a resume): the same bits.
    s = seqs[-1]
    split = 9  # off the grid of query tiles (block_q 2 or 4)
    rows = slice(s.row, s.row + s.num_new)
    chunked = launch([SeqSlice(s.row, split, s.start_pos, s.slots)])
    chunked[s.row + split : rows.stop] = launch([SeqSlice(s.row + split, s.num_new - split, s.start_pos + split,
                                                           s.slots)])[s.row + split : rows.stop]
    report["chunked_bitwise"] = bool(torch.equal(chunked[rows], together[rows]))
    return report


def _expanded_case(shape: str, dtype_name: str, lengths: list[tuple[int, int]] = EXPANDED_SEQS,
                   device: str = "cpu") -> list[dict[str, Any]]:
    """The multi-head form, one chunk per (start, new tokens), against the float64 softmax (mapped out by W_UV)
    and `attend_decompressed`: [{'seq', 'rel_float64', 'rel_torch_tiles', 'nan'}]."""
    import torch

    from k2serve.worker.kernels.triton_mla import ExpandedTiles, mla_expanded
    from k2serve.worker.model.attention_tiles import Tiles, attend_decompressed

    heads, c, r, nope, v_dim, custom = {**EXPANDED_SHAPES, **GPU_EXPANDED_SHAPES}[shape]
    dtype = getattr(torch, dtype_name)
    tiles = ExpandedTiles.for_shape(heads, nope, v_dim, dtype) if custom is None else ExpandedTiles(*custom)
    gen = torch.Generator().manual_seed(zlib.crc32(f"expanded|{shape}|{dtype_name}".encode()))
    w_uk = (torch.randn(heads, nope, c, generator=gen) / c**0.5).to(device, dtype)  # [H, nope, c]
    w_uv = (torch.randn(heads, v_dim, c, generator=gen) / c**0.5).to(device, dtype)  # [H, v, c]
    report = []
    for start, n in lengths:
        data = torch.randn(start + n + 40, c + r, generator=gen).to(device, dtype)  # [slots, c + r]
        slots = torch.randperm(data.shape[0], generator=gen)[: start + n].to(device)  # [ctx]: scattered rows
        q_nope = torch.randn(n, heads, nope, generator=gen).to(device, dtype)
        q_rope = torch.randn(n, heads, r, generator=gen).to(device, dtype)
        ours = mla_expanded(q_nope, q_rope, lambda a, b: data[slots[a:b]], start, c, w_uk.transpose(1, 2),
                            w_uv.transpose(1, 2), SCALE, tiles).double()  # [n, H, v]
        q_lat = torch.einsum("nhd,hdc->nhc", q_nope.double(), w_uk.double())
        latents = _reference(torch.cat([q_lat, q_rope.double()], dim=-1), data[slots].double(), start, c)
        expected = torch.einsum("nhc,hvc->nhv", latents, w_uv.double())  # [n, H, v]
        torch_tiles = attend_decompressed(q_nope, q_rope, lambda a, b: data[slots[a:b]], start, c,
                                          w_uk.transpose(1, 2), w_uv.transpose(1, 2), SCALE, Tiles(16, 32)).double()
        report.append({
            "seq": [start, n], "nan": bool(ours.isnan().any()),
            "rel_float64": ((ours - expected).abs().max() / expected.abs().max()).item(),
            "rel_torch_tiles": ((ours - torch_tiles).abs().max() / torch_tiles.abs().max()).item(),
        })
    return report


def _layer_case(deterministic: bool, expanded: bool = False) -> float:
    """A tiny-k2 attention layer over a step of a prefill chunk and two decodes, kernel path against torch path
    (fp32): max relative error of the layer's output. `expanded`: chunks of more than 8 queries take the
    multi-head form (on tiny-k2's dims it never pays, so the test decides)."""
    import torch

    from k2serve.worker.loader import load_weights, resolve_checkpoint
    from k2serve.worker.model import mla
    from k2serve.worker.model.batch import ForwardBatch, LatentKVCache, SeqSlice
    from k2serve.worker.model.k2 import K2Model

    w = load_weights(resolve_checkpoint("builtin:tiny-k2"))
    model = K2Model(w.config, w.dense, w.experts, deterministic=deterministic)
    attn = model.layers[1][1]
    if expanded:
        attn._decompress_pays = lambda n: n > 8  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(7)
    page, num_blocks = 16, 24
    order = torch.randperm(num_blocks, generator=gen)
    lengths = [(0, 70), (45, 1), (18, 1)]  # (start, new): prefix positions are written first
    slots = [(order[i * 6 : i * 6 + 6, None] * page + torch.arange(page)).flatten() for i in range(len(lengths))]
    prefix = [SeqSlice(0, start, 0, sl) for (start, _), sl in zip(lengths, slots) if start]
    step = []
    row = 0
    for (start, n), sl in zip(lengths, slots):
        step.append(SeqSlice(row, n, start, sl))
        row += n
    x_prefix = torch.randn(sum(s.num_new for s in prefix), w.config.hidden_size, generator=gen)
    x_step = torch.randn(row, w.config.hidden_size, generator=gen)  # [T, D]

    def run(kernel: bool) -> torch.Tensor:
        mla.use_paged_kernel = lambda device: kernel  # type: ignore[assignment]  # this child process only
        kv = LatentKVCache(w.config, num_blocks, page, model.dtype, model.device)
        out = None
        for seqs, x in ((prefix, x_prefix), (step, x_step)):
            r = 0
            for s in seqs:
                s.row, r = r, r + s.num_new
            pos = torch.cat([torch.arange(s.start_pos, s.context_len) for s in seqs])
            batch = ForwardBatch(torch.zeros(r, dtype=torch.int64), pos, seqs, torch.zeros(1, dtype=torch.int64))
            cos, sin = model.rotary.cos_sin(pos, model.dtype)
            out = attn(x, batch, kv, cos, sin, model.rotary)
        assert out is not None
        return out

    ours, expected = run(True), run(False)
    return ((ours - expected).abs().max() / expected.abs().max()).item()


def _child() -> dict[str, Any]:
    """Runs with TRITON_INTERPRET=1: every case's measurements."""
    report: dict[str, Any] = {f"{shape}|{dtype}": _launch_case(shape, dtype) for shape in SHAPES for dtype in DTYPES}
    report |= {f"expanded|{shape}|{dtype}": _expanded_case(shape, dtype) for shape in EXPANDED_SHAPES
               for dtype in DTYPES}
    report["layer"] = _layer_case(False)
    report["layer_deterministic"] = _layer_case(True)
    report["layer_expanded"] = _layer_case(False, expanded=True)
    return report


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    from helpers.child import run_script_report  # not at the top: this file also runs as a plain script

    return run_script_report(__file__, interpret=True, timeout_s=600)


CASES = [f"{shape}|{dtype}" for shape in SHAPES for dtype in DTYPES]


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_the_float64_softmax(report: dict[str, Any], case: str) -> None:
    tol = DTYPES[case.split("|")[1]]
    assert not report[case]["nan"], "a row of the output was never written"
    for seq in report[case]["seqs"]:
        assert seq["rel_float64"] <= tol, seq


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_the_torch_tiles(report: dict[str, Any], case: str) -> None:
    """The CPU path and the GPU kernel compute the same attention: fp32 within 1e-5; in fp16 the kernel rounds
    its probabilities to fp16 for the value product (as flash attention does), the torch tiles do not."""
    tol = DTYPES[case.split("|")[1]]
    for seq in report[case]["seqs"]:
        assert seq["rel_torch_tiles"] <= tol, seq


@pytest.mark.parametrize("case", CASES)
def test_a_sequence_gets_the_same_bits_alone_or_in_a_batch(report: dict[str, Any], case: str) -> None:
    assert all(seq["alone_bitwise"] for seq in report[case]["seqs"]), report[case]["seqs"]


@pytest.mark.parametrize("case", CASES)
def test_a_chunk_split_elsewhere_gets_the_same_bits(report: dict[str, Any], case: str) -> None:
    assert report[case]["chunked_bitwise"]


def test_the_cases_cross_tiles_and_pages(report: dict[str, Any]) -> None:
    """The shapes really put several key tiles in a page and several pages in a tile (else the block-table walk
    goes untested)."""
    page_default, tiles_default = SHAPES["tiny_default"][3], report["tiny_default|float32"]["tiles"]
    assert tiles_default[2] > page_default
    assert SHAPES["tiny_page_spans_tiles"][3] > report["tiny_page_spans_tiles|float32"]["tiles"][2]


EXPANDED_CASES = [f"expanded|{shape}|{dtype}" for shape in EXPANDED_SHAPES for dtype in DTYPES]


@pytest.mark.parametrize("case", EXPANDED_CASES)
def test_multi_head_form_matches_the_float64_softmax_and_the_torch_tiles(report: dict[str, Any], case: str) -> None:
    tol = DTYPES[case.split("|")[2]]
    for seq in report[case]:
        assert not seq["nan"], seq
        assert seq["rel_float64"] <= tol, seq
        assert seq["rel_torch_tiles"] <= tol, seq


@pytest.mark.parametrize("key", ["layer", "layer_deterministic", "layer_expanded"])
def test_the_layer_attends_through_the_kernel_as_through_the_tiles(report: dict[str, Any], key: str) -> None:
    assert report[key] <= 1e-5, f"max relative error {report[key]:.2e}"


def test_bad_inputs_are_refused_before_launch() -> None:
    import torch

    from k2serve.worker.kernels.triton_mla import ExpandedTiles, MLATiles, mla_expanded, paged_mla_absorbed
    from k2serve.worker.model.batch import ForwardBatch, SeqSlice

    tiles = MLATiles.for_shape(4, 64)
    batch = ForwardBatch(torch.zeros(3, dtype=torch.int64), torch.arange(3), [SeqSlice(0, 3, 0, torch.arange(16))],
                         torch.zeros(1, dtype=torch.int64))
    plan = batch.paged_plan(16, tiles.block_q, torch.device("cpu"))
    q_lat, q_rope, cache = torch.randn(3, 4, 64), torch.randn(3, 4, 16), torch.randn(16, 80)
    with pytest.raises(ValueError, match="share one of"):
        paged_mla_absorbed(q_lat, q_rope, cache.half(), plan, 0.1, tiles)
    with pytest.raises(ValueError, match="cache must be"):
        paged_mla_absorbed(q_lat, q_rope, cache[:, :72], plan, 0.1, tiles)
    with pytest.raises(ValueError, match="queries per program"):
        paged_mla_absorbed(q_lat, q_rope, cache, plan, 0.1, MLATiles(8, 4, 32))
    with pytest.raises(ValueError, match="contiguous"):
        paged_mla_absorbed(q_lat.transpose(1, 2).contiguous().transpose(1, 2), q_rope, cache, plan, 0.1, tiles)
    w_uk_t, w_uv_t = torch.randn(4, 64, 32), torch.randn(4, 64, 32)
    with pytest.raises(ValueError, match="share one of"):
        mla_expanded(torch.randn(3, 4, 32), q_rope, lambda a, b: cache[a:b], 0, 64, w_uk_t.half(), w_uv_t, 0.1,
                     ExpandedTiles(16, 16, 32))
    with pytest.raises(ValueError, match="multiple of block_n"):
        mla_expanded(torch.randn(3, 4, 32), q_rope, lambda a, b: cache[a:b], 0, 64, w_uk_t, w_uv_t, 0.1,
                     ExpandedTiles(16, 16, 40))


def test_an_empty_step_launches_nothing() -> None:
    """An expert-parallel rank can step with no tokens: the plan is empty and the output has no rows."""
    import torch

    from k2serve.worker.kernels.triton_mla import MLATiles, paged_mla_absorbed
    from k2serve.worker.model.batch import ForwardBatch

    tiles = MLATiles.for_shape(4, 64)
    empty = torch.zeros(0, dtype=torch.int64)
    plan = ForwardBatch(empty, empty, [], empty).paged_plan(16, tiles.block_q, torch.device("cpu"))
    assert plan.work.shape == (0, 2)
    out = paged_mla_absorbed(torch.randn(0, 4, 64), torch.randn(0, 4, 16), torch.randn(32, 80), plan, 0.1, tiles)
    assert out.shape == (0, 4, 64)


def test_benchmark_smoke(tmp_path: Path) -> None:
    """bench/kernel_mla.py end to end on the interpreter: every row measured, both kernels agreeing with torch."""
    report = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench/kernel_mla.py", "--smoke", "--json", str(report)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    measured = json.loads(report.read_text())
    assert {(r["batch"], r["context"]) for r in measured["decode"]} == {(1, 40), (3, 40), (1, 100), (3, 100)}
    for r in measured["decode"]:
        assert r["triton_us"] > 0 and r["torch_us"] > 0 and r["mb"] > 0, r
        assert r["max_rel_err_vs_torch"] <= DTYPES["float16"], r
    for r in measured["prefill"]:
        assert r["max_rel_err_absorbed"] <= DTYPES["float16"] and r["max_rel_err_multi_head"] <= DTYPES["float16"], r


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("dtype", list(GPU_DTYPES))
def test_kernel_on_cuda_at_k2_dims(shape: str, dtype: str) -> None:
    """Compiled for the GPU it runs on (bench/gpu_check.sh): long contexts, the same measurements as above."""
    import torch

    assert torch.cuda.is_available(), "this test needs a CUDA device (bench/gpu_check.sh runs it)"
    measured = _launch_case(shape, dtype, GPU_SEQS, "cuda")
    assert not measured["nan"], "a row of the output was never written"
    for seq in measured["seqs"]:
        assert seq["rel_float64"] <= GPU_DTYPES[dtype], seq
        assert seq["rel_torch_tiles"] <= GPU_DTYPES[dtype], seq
        assert seq["alone_bitwise"], seq
    assert measured["chunked_bitwise"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(GPU_DTYPES))
def test_multi_head_form_on_cuda_at_k2_dims(dtype: str) -> None:
    import torch

    assert torch.cuda.is_available(), "this test needs a CUDA device (bench/gpu_check.sh runs it)"
    for seq in _expanded_case("k2", dtype, GPU_EXPANDED_SEQS, "cuda"):
        assert not seq["nan"], seq
        assert seq["rel_float64"] <= GPU_DTYPES[dtype], seq
        assert seq["rel_torch_tiles"] <= GPU_DTYPES[dtype], seq


if __name__ == "__main__":
    print(json.dumps(_child()))
