"""`mtllm demo` (`make demo`): the whole stage-1 pipeline on the embedded default, on CPU, in a few minutes.

1. build aligned shards from the shipped English sample (minus 20 held-out documents) with the tiny tokenizers;
2. train the tiny stack (configs/tiny.yaml) on 2 processes with FSDP2 over gloo, via launch/torchrun_single_node.sh;
3. half-way, ask for a preemption as a cluster scheduler does (the run folder's STOP file, which
   launch/slurm_multinode.sbatch writes before the time limit): the ranks agree at the step boundary, checkpoint
   and exit 0;
4. rerun the same command: training resumes from that checkpoint and finishes;
5. export the MT-LLM, load it back three ways (load_mtllm, transformers' AutoModel, sentence-transformers), embed
   the held-out documents and compare with the teacher;
6. print a summary and point at the loss curve.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mtllm_train.config import load_config
from mtllm_train.data.manifest import MANIFEST
from mtllm_train.data.shard_writer import build_shards
from mtllm_train.portable.tokens import ENGLISH, pad_id, pad_right
from mtllm_train.run_folder import RunFolder

# The demo's files live in the repository, so it runs from any folder.
ROOT = Path(__file__).resolve().parents[1]
CONFIG, SAMPLE, LAUNCHER = (ROOT / "configs/tiny.yaml", ROOT / "shards/sample/enwiki_sample.jsonl",
                            ROOT / "launch/torchrun_single_node.sh")
HELD_OUT = 20


def _launch(overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "NPROC": "2", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(["bash", str(LAUNCHER), str(CONFIG), *overrides], env=env)


def run_demo(workdir: str, steps: int | None = None) -> None:
    start = time.perf_counter()
    cfg = load_config(CONFIG, [f"train.steps={steps}"] if steps else [])
    documents = Path(SAMPLE).read_text(encoding="utf-8").splitlines()
    held_out = [json.loads(line)["text"][:600] for line in documents[-HELD_OUT:]]
    Path(workdir).mkdir(parents=True, exist_ok=True)
    train_file, shards = Path(workdir) / "train.jsonl", Path(workdir) / "shards"
    train_file.write_text("\n".join(documents[:-HELD_OUT]) + "\n", encoding="utf-8")
    print(f"[1/5] shards: {SAMPLE} minus {HELD_OUT} held-out documents -> {shards}")
    if not (shards / MANIFEST).is_file():
        build_shards([str(train_file)], str(shards), cfg.model.llm_tokenizer, cfg.model.mt_tokenizer, ENGLISH,
                     cfg.data.max_length, shard_size=50, workers=1)

    overrides = [f"run.dir={workdir}", f"data.shards={shards}", "distributed.backend=fsdp",
                 f"train.steps={cfg.train.steps}"]
    run = RunFolder(Path(workdir) / cfg.run.name)
    run_dir, metrics = run.path, run.metrics_file
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo starts from step 0 every time
    print(f"[2/5] stage 1 on 2 processes (FSDP2, gloo): {cfg.train.steps} steps of {cfg.train.global_batch_size} sequences")
    launcher = _launch(overrides)
    while launcher.poll() is None and (not metrics.is_file() or len(metrics.read_text().splitlines()) < cfg.train.steps // 2):
        time.sleep(0.05)
    if launcher.poll() is None:
        print("[3/5] preemption (the scheduler's STOP file): both trainers agree, checkpoint and exit 0")
        run.stop_file.touch()
    if launcher.wait() != 0:
        raise SystemExit("the first training launch failed; see its output above")
    print("[3/5] rerunning the same command: resume from the newest complete checkpoint")
    if _launch(overrides).wait() != 0:
        raise SystemExit("the resumed training launch failed; see its output above")

    print("[4/5] export + load: mtllm_train.export.load_mtllm, transformers' AutoModel, sentence-transformers")
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from mtllm_train.export import export_run, load_mtllm
    from mtllm_train.model.stack import build_stack

    export_dir = export_run(str(run_dir), str(run.export_dir))
    model = load_mtllm(export_dir)
    teacher = model.encode_teacher(held_out)
    trained = model.encode(held_out, lang=ENGLISH)
    routes = {"AutoModel": AutoModel.from_pretrained(str(export_dir), trust_remote_code=True).encode(held_out),
              "SentenceTransformer": SentenceTransformer(str(export_dir), trust_remote_code=True).encode(
                  held_out, convert_to_tensor=True)}
    # The same stack before stage 1, on the same tokens, for comparison.
    ids, mask = pad_right(model.tokenizer(held_out, truncation=True, max_length=cfg.data.max_length)["input_ids"],
                          pad_id(model.tokenizer))
    with torch.no_grad():
        untrained = build_stack(cfg.model).eval().student_pooled(ids, mask)

    records = run.metrics()
    print("[5/5] summary")
    # Completed optimizer steps, as everywhere: the first record is the state after step 1.
    print(f"  steps            {records[0]['step'] - 1} -> {records[-1]['step']} (resumed once)")
    print(f"  loss             {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}   "
          f"FVU {records[0]['fvu']:.3f} -> {records[-1]['fvu']:.3f}")
    print(f"  throughput       {statistics.median(r['seqs_per_s'] for r in records):.1f} seqs/s, "
          f"{statistics.median(r['llm_tokens_per_s'] + r['mt_tokens_per_s'] for r in records):.0f} tokens/s "
          f"(median), padding efficiency {statistics.median(r['padding_efficiency'] for r in records):.3f}")
    for name, student in (("before stage 1", untrained), ("after stage 1", trained)):
        cosine = torch.nn.functional.cosine_similarity(student, teacher).mean().item()
        print(f"  held-out docs    {name:15s} MSE to teacher {(student - teacher).pow(2).mean().item():.4f}, "
              f"mean cosine {cosine:+.3f}")
    print("  (random tiny models: the student learns the teacher's average representation, FVU stays near 1;"
          " real weights: bench/mini_repro)")
    for route, vectors in routes.items():
        print(f"  export loaded by {route:20s} max |difference| to load_mtllm {(vectors - trained).abs().max().item():.1e}")
    print(f"  run folder       {run_dir}  (config.yaml, metrics.jsonl, checkpoints/, export/ with its README.md)")
    print(f"  loss curve       {run.plot_file}")
    print(f"  total time       {time.perf_counter() - start:.0f}s")
