"""bench/ncu_table.py reads an Nsight Compute raw-page CSV (as `ncu --import R --csv --page raw --print-units base`
writes it) into a per-kernel table; bench/nsys_check.sh's one-step capture is a config the trainer accepts."""
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from bench import ncu_table

REPO = Path(__file__).resolve().parents[1]

# the shape of ncu's raw CSV: ==PROF== lines around it, a header, a units row, one row per launch; numbers may
# carry thousands separators; kernel names are demangled with templates and parameters
CSV = """==PROF== Connected to process 123
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum","sm__ops_path_tensor_src_bf16_dst_fp32.sum","sm__ops_path_tensor_src_bf16_dst_fp32_sparsity_on.sum"
"","","","","","","","","","","","byte","byte","nsecond","",""
"0","123","python","h","_norm_fwd_kernel","1","7","(256, 1, 1)","(16384, 1, 1)","0","9.0","302,000,000","151,000,000","120,000","0","0"
"1","123","python","h","nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopB_NNT","1","7","(384, 1, 1)","(132, 1, 1)","0","9.0","10,000,000","5,000,000","700,000","521,838,526,464","0"
"2","123","python","h","_norm_fwd_kernel","1","7","(256, 1, 1)","(16384, 1, 1)","0","9.0","302,000,000","151,000,000","130,000","0","0"
"3","123","python","h","void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char *, 1>>(int, T2, T3)","1","7","(128, 1, 1)","(8, 1, 1)","0","9.0","0","4,096","2,000","0","0"
==PROF== Disconnected from process 123
"""


def test_rows_and_summary_from_ncu_raw_csv():
    rows = ncu_table.read_rows(CSV)
    assert len(rows) == 4 and rows[0]["time_ns"] == 120_000 and rows[0]["dram_bytes"] == 453_000_000
    assert rows[1]["tensor_ops"] == 521_838_526_464  # the sparsity counter is not added
    s = ncu_table.summarize(rows)
    norm = s["kernels"]["_norm_fwd_kernel"]
    assert norm["launches"] == 2 and norm["time_ms"] == pytest.approx(0.25) and norm["category"] == "fused glue (ours)"
    assert norm["dram_GBps"] == pytest.approx(2 * 453e6 / 250e-6 / 1e9)  # 3624 GB/s
    gemm = s["kernels"]["nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopB_NNT"]
    assert gemm["category"] == "matmul" and gemm["tensor_TFLOPs"] == pytest.approx(521.838526464 / 0.7)
    assert list(s["kernels"])[0] == "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopB_NNT"  # by time
    assert "vectorized_elementwise_kernel" in s["kernels"]  # templates and parameters dropped
    assert s["launches"] == 4 and s["kernel_time_ms"] == pytest.approx(0.952)
    assert s["categories"]["fused glue (ours)"]["dram_GBps"] == pytest.approx(norm["dram_GBps"])
    md = ncu_table.markdown(s)
    assert re.search(r"\| `_norm_fwd_kernel` \| fused glue \(ours\) \| 2 \| 0\.250 \| 3624 \|", md), md


def test_cli_writes_json_and_markdown_and_refuses_other_files(tmp_path, capsys):
    src = tmp_path / "step.csv"
    src.write_text(CSV)
    ncu_table.main([str(src), "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "ncu_step.json").read_text())["launches"] == 4
    assert "| kernel | category |" in (tmp_path / "out" / "ncu_step.md").read_text()
    for text, why in (("==PROF== nothing\n", "no CSV rows"),
                      ('"ID","Name"\n"0","k"\n', "the CSV has no Kernel Name / Function Name / Name or gpu__time_duration")):
        src.write_text(text)
        with pytest.raises(SystemExit, match=f"bench.ncu_table: {re.escape(str(src))}: {why}"):
            ncu_table.main([str(src)])
    with pytest.raises(SystemExit, match="missing.csv"):
        ncu_table.main([str(tmp_path / "missing.csv")])


def test_nsys_check_step_is_a_config_the_trainer_accepts():
    """The one step ncu captures: the shipped XL/1 config at XL widths, 2 blocks, batch 256, a one-step profile
    window; its overrides load (the GPU machine would otherwise find a typo after minutes)."""
    from modeling.config import load_config
    from train.dit_config import DiTTrainConfig
    script = (REPO / "bench" / "nsys_check.sh").read_text()
    block = script[script.index("STEP=("):]
    block = block[:block.index(")\n")]
    argv = shlex.split(block.removeprefix("STEP=(").replace("\\\n", " "))
    argv = [a.replace("$RUN", "/tmp/run") for a in argv]
    assert argv[:3] == ["$PY", "-m", "train.train_dit"] and argv[3] == "--config"
    cfg = load_config(DiTTrainConfig, REPO / argv[4], argv[5:])
    assert (cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads, cfg.model.patch_size) == (1152, 2, 16, 1)
    assert cfg.train.batch_per_gpu == 256 and cfg.train.compile == "blocks" and cfg.train.precision == "bf16"
    assert cfg.profile.start_step < cfg.train.steps and cfg.profile.num_steps == 1
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "nsys_check.sh")]).returncode == 0
