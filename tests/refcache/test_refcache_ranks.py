"""Ranks agree on cache hit or miss even when another job writes the cache file between their
reads (issue 13 item 3). Two real gloo processes; the interleaving is forced, not left to timing:
the rank that reads first sees no file, the "other job" then writes it, the other rank sees it.

Run as a script, this file is one rank of that job (see worker)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def worker(rank: int, first: int, model_dir: str, cache_dir: str, other_jobs_file: str, work: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist
    from refcache_helpers import make_examples
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastnpo.distributed import ProcessInfo
    from fastnpo.refcache import build, reference_logprobs

    dist.init_process_group(
        "gloo", init_method=f"file://{work}/store", rank=rank, world_size=2, timeout=timedelta(seconds=20)
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    written = Path(work) / "other-job-wrote"
    real_read, reads = build._read, []

    def forced_read(path, key, parts):
        reads.append(path)
        if len(reads) > 1:  # reading back after the compute
            return real_read(path, key, parts)
        if rank == first:  # reads before the other job's write...
            result = real_read(path, key, parts)
            shutil.copyfile(other_jobs_file, path)  # ...which lands right after
            written.touch()
            return result
        deadline = time.time() + 60
        while not written.exists() and time.time() < deadline:
            time.sleep(0.01)
        return real_read(path, key, parts)

    build._read = forced_read
    ref, hit = reference_logprobs(
        model,
        tokenizer,
        {"forget": make_examples(tokenizer, 12)},
        pad_token_id=tokenizer.pad_token_id,
        batch_size=4,
        cache_dir=cache_dir,
        info=ProcessInfo(rank, 2, 0, torch.device("cpu")),
        log=lambda line: print(line, flush=True),
    )
    result = {"hit": hit, "logps": ref.logps["forget"].tolist()}
    (Path(work) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from refcache_helpers import TEXTS

    from fastnpo.tiny import TinyModelSpec, build_tiny_model, build_tokenizer

    folder = tmp_path_factory.mktemp("model")
    tokenizer = build_tokenizer(TEXTS, vocab_size=300)
    build_tiny_model(tokenizer, TinyModelSpec(hidden_size=16, intermediate_size=32)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("first", [0, 1])
@pytest.mark.torchrun
def test_ranks_agree_when_another_job_writes_the_cache_between_their_reads(tmp_path, tiny_model, first):
    from refcache_helpers import make_examples
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastnpo.refcache import reference_logprobs

    # The other job: one process, its own cache folder, then its file appears in the shared one.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    other, _ = reference_logprobs(
        model,
        tokenizer,
        {"forget": make_examples(tokenizer, 12)},
        pad_token_id=tokenizer.pad_token_id,
        batch_size=4,
        cache_dir=tmp_path / "other-cache",
        log=lambda line: None,
    )
    (other_file,) = (tmp_path / "other-cache").glob("ref-logprobs-*.safetensors")
    shared = tmp_path / "shared-cache"
    shared.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    arguments = [str(first), str(tiny_model), str(shared), str(other_file), str(tmp_path)]
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), *arguments],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [process.communicate(timeout=120)[0] for process in ranks]
    finally:
        for process in ranks:
            process.kill()
    assert [p.returncode for p in ranks] == [0, 0], "\n".join(outputs)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0]["hit"] == results[1]["hit"] is False  # one decision: a miss, since one rank missed
    assert results[0]["logps"] == results[1]["logps"]
    # Both jobs end with the same numbers (computed by two batchings: float noise at most).
    torch.testing.assert_close(torch.tensor(results[0]["logps"]), other.logps["forget"], rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:7])
