"""Every Triton kernel, compiled for sm_80 and sm_90a at every launch configuration the dispatcher can choose, is
GPU-grade: no register spills, shared memory within the architecture's per-block limit, tensor-core MMA for every
dtype in the fused kernels (tf32x3 for fp32; rowchunk's element-wise pass has none, cuBLAS runs its products), no
atomics and no GPU-scope fences. Rowchunk, which stores G over the logits it reads, holds each row in one warp in
every 2-D load and store (the interpreter runs a program's block in order, so no CPU run can show a race between
its warps: the compiled layouts are read instead), with vector loads and stores also for V = 32,001. Compiling needs
no GPU (the report runs Triton's real compiler and ptxas); it runs in a subprocess because the suite's
TRITON_INTERPRET=1 replaces the compiler."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def report_rows(tmp_path_factory):
    dump = tmp_path_factory.mktemp("ptx")
    result = subprocess.run(
        [sys.executable, "-m", "bench.kernel_compile", "--json", "--dump", str(dump)],
        env=ENV, capture_output=True, text=True, timeout=900, check=False, cwd=REPO,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), dump


def test_every_dispatcher_launch_compiles_without_spills_fences_or_atomics(report_rows):
    rows, _ = report_rows
    combos = {(row["kernel"], row["arch"], row["dtype"], row["variant"]) for row in rows}
    # (forward, logit_grad x plain, bias+softcap + rowchunk x plain, bias+softcap, v32001) x sm_80, sm_90a x bf16, fp32
    assert len(combos) == len(rows) == (2 * 2 + 3) * 2 * 2
    limits = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}
    for row in rows:
        assert row["spill_bytes"] == 0, row
        assert 0 < row["shared_bytes"] <= limits[row["arch"]], row
        if row["kernel"] == "rowchunk":
            # element-wise: its products run in cuBLAS; G over Z with no warp storing over another's loads
            assert row["mma"] == "none" and not row["mma_expected"], row
            assert row["warp_rows"] == "one warp per row" and row["vector_io"] > 0, row
        else:
            assert row["mma"] == ("wgmma" if row["arch"] == "sm_90a" and row["dtype"] != "fp32" else "mma"), row
        assert row["atomics"] == 0 and row["fences"] == 0, row
        assert row["registers"] <= 255, row


def test_dump_writes_one_ptx_per_compiled_launch(report_rows):
    rows, dump = report_rows
    names = {path.name for path in dump.glob("*.ptx")}
    plain = {f"{r['kernel']}-{r['arch']}-{r['dtype']}-{r['config']}.ptx" for r in rows if r["variant"] == "plain"}
    assert plain <= names and len(names) == len(rows)
    assert all(".target sm_" in (dump / name).read_text()[:2000] for name in names)


def test_the_layout_check_finds_the_race_of_a_row_over_two_warps():
    """m8-v512 for bf16 is laid out warpsPerCTA [4, 2] (a row's columns over two warps, no barrier in pass 2): the
    report must call it a race and fail."""
    from bench import kernel_compile

    result = subprocess.run(
        [sys.executable, "-m", "bench.kernel_compile", "--json", "--kernels", "rowchunk", "--archs", "sm_90a",
         "--dtypes", "bf16", "--variants", "plain", "--configs", "m8-v512-w8-s3"],
        env=ENV, capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    (row,) = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["warp_rows"].startswith("RACE") and "[4, 2]" in row["warp_rows"], row
    assert any(problem.startswith("RACE") for problem in kernel_compile.problems(row))


def test_the_layout_check_reads_ownership_and_barriers():
    """`warp_rows` on TTGIR text shaped as triton writes it: one layout with one warp across the columns; a row over
    two warps; the same with a barrier between the loads and the stores; loads and stores mapping rows differently."""
    from bench.kernel_compile import warp_rows

    def ttgir(load_warps, store_warps, barrier=""):
        layout = "#ttg.blocked<{{sizePerThread = [1, 8], threadsPerWarp = [1, 32], warpsPerCTA = {}, order = [1, 0]}}>"
        return "\n".join([
            f"#blocked = {layout.format(load_warps)}",
            f"#blocked1 = {layout.format(store_warps)}",
            "%z = tt.load %p, %m, %c : tensor<8x256x!tt.ptr<f32>, #blocked> loc(#loc1)",
            barrier,
            "tt.store %q, %g, %m : tensor<8x256x!tt.ptr<bf16>, #blocked1> loc(#loc2)",
        ])  # fmt: skip

    assert warp_rows(ttgir("[8, 1]", "[8, 1]")) == "one warp per row"
    assert warp_rows(ttgir("[4, 2]", "[4, 2]")).startswith("RACE: load with warpsPerCTA [4, 2]")
    assert warp_rows(ttgir("[4, 2]", "[4, 2]", "ttg.barrier all loc(#loc3)")) == "barrier"
    assert warp_rows(ttgir("[4, 2]", "[4, 2]", "gpu.barrier loc(#loc3)")) == "barrier"
    # one warp per row in each, but row r in different warps: the store's warp is not the load's
    different = ttgir("[8, 1]", "[8, 1]").replace(
        "sizePerThread = [1, 8], threadsPerWarp = [1, 32], warpsPerCTA = [8, 1]",
        "sizePerThread = [2, 8], threadsPerWarp = [1, 32], warpsPerCTA = [4, 1]",
        1,
    )
    assert "map rows to warps differently" in warp_rows(different)
