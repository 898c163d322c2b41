"""export_model: the trained policy as a Hugging Face folder that transformers (and vLLM) load as trained."""

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from areal.checkpoint.export import export_model
from areal.model import ModelConfig, load_tokenizer
from areal.trainer.batch import build_batch
from areal.trainer.config import TrainerConfig
from areal.trainer.engine import TrainEngine

from test_deepspeed import free_port
from test_packing import skewed_groups
from test_train_state import partition_everything

TINY_MATH = Path(__file__).resolve().parents[1] / "assets" / "models" / "tiny-math"
PROMPT = [2, 40, 41, 42, 43, 44, 45]
# ZeRO-3 computes log-probs through the materialised head, not the chunked kernel: the gradients differ in the
# last bits, and Adam's first step (~ lr * sign(g)) amplifies that on near-zero gradients. A weight gathered
# from the wrong partition would be off by the size of the weights (~1e-2 and more).
ZERO3_ATOL = 1e-3


def base_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY_MATH, dtype=torch.float32)


def trained_engine(backend="torch", stage=0, steps=1) -> TrainEngine:
    cfg = TrainerConfig(backend=backend, zero_stage=stage, lr=1e-2, minibatches=1, max_tokens_per_microbatch=64)
    engine = TrainEngine(base_model(), cfg, temperature=1.0)
    for s in range(steps):
        engine.train_step(build_batch(skewed_groups(seed=s, groups=2), None, pad_token_id=0))
    return engine


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_holds(model, weights: dict[str, torch.Tensor]) -> None:
    """`model` has exactly `weights` (HF names), the tied head included."""
    state = model.state_dict()
    for name, w in weights.items():
        assert torch.equal(state[name], w.float()), name
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(path=str(TINY_MATH)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """(engine after one update, its export)."""
    engine = trained_engine()
    out = tmp_path_factory.mktemp("export") / "model"
    assert export_model(engine, out, tokenizer) == out
    return engine, out


def test_export_has_the_trained_weights_and_logits(exported):
    engine, out = exported
    weights = {name: w.clone() for name, w in engine.named_weights()}
    assert not torch.equal(weights["model.embed_tokens.weight"], base_model().model.embed_tokens.weight)  # trained
    model = load(out)
    assert_holds(model, weights)
    ids = torch.tensor([PROMPT])
    engine.model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, engine.model(ids).logits)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no .tmp / .old left


def test_export_has_tokenizer_and_generation_config(exported, tokenizer):
    from transformers import AutoTokenizer, GenerationConfig

    _, out = exported
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded = AutoTokenizer.from_pretrained(out)
    text = "Q: 12+7=?\nA: "
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == 1 and gen.pad_token_id == 0


def test_export_replaces_an_existing_folder(tmp_path, tokenizer):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    engine = trained_engine(steps=2)
    export_model(engine, out, tokenizer, base_model_path=str(TINY_MATH))
    assert not (out / "stale.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (out / "BUILD_INFO.json").is_file()  # a base-folder file the export did not write itself
    assert_holds(load(out), dict(engine.named_weights()))


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_export_equals_the_unpartitioned_weights(stage, tmp_path, tokenizer, monkeypatch):
    """ZeRO-2 (parameters are views of one flat buffer) and ZeRO-3 with every parameter partitioned: the
    export holds the gathered weights, and matches the torch backend's after the same update."""
    pytest.importorskip("deepspeed")
    partition_everything(monkeypatch)
    engine = trained_engine("deepspeed", stage)
    weights = {name: w.clone() for name, w in engine.named_weights()}
    if stage == 3:
        assert engine.model.model.embed_tokens.weight.numel() == 0  # really partitioned outside a gather
    assert export_model(engine, tmp_path / "model", tokenizer) == tmp_path / "model"
    model = load(tmp_path / "model")
    assert_holds(model, weights)
    for name, w in trained_engine("torch").named_weights():
        torch.testing.assert_close(model.state_dict()[name], w, atol=1e-6 if stage < 3 else ZERO3_ATOL, rtol=0)


def _rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    partition_everything(pytest.MonkeyPatch())
    engine = trained_engine("deepspeed", 3)
    local = {name: list(p.ds_tensor.shape) for name, p in engine.model.named_parameters()}
    result = export_model(engine, Path(out_dir) / "model", load_tokenizer(ModelConfig(path=str(TINY_MATH))))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"result": None if result is None else str(result), "partitions": local}, f)
    torch.distributed.destroy_process_group()


def test_two_rank_zero3_export(tmp_path):
    """Two ranks, each holding half of every parameter: rank 0 writes the whole model, rank 1 nothing."""
    pytest.importorskip("deepspeed")
    mp.start_processes(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["result"] == str(tmp_path / "model") and ranks[1]["result"] is None
    assert ranks[0]["partitions"]["model.embed_tokens.weight"] == [260 * 128 // 2]
    single = trained_engine("torch")  # the same update in one process (test_deepspeed: 2 ranks match 1)
    model = load(tmp_path / "model")
    for name, w in single.named_weights():
        torch.testing.assert_close(model.state_dict()[name], w, atol=ZERO3_ATOL, rtol=0)


# ---- vLLM (its own virtualenv, scripts/setup_vllm_cpu.sh) --------------------------------------------
VLLM_PYTHON = Path(os.environ.get("VLLM_PYTHON", str(Path.home() / ".venvs" / "vllm-cpu" / "bin" / "python")))

VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams

    def main():  # vLLM spawns its engine core: everything under the __main__ guard
        model_dir, prompt, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
        llm = LLM(model=model_dir, dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        print("VLLM_TOKENS " + json.dumps(list(out[0].outputs[0].token_ids)), flush=True)

    if __name__ == "__main__":
        main()
    """
)


def test_vllm_loads_the_export_and_generates_like_areal(exported, tokenizer, tmp_path):
    if not VLLM_PYTHON.exists():
        pytest.skip(f"vLLM CPU virtualenv not found at {VLLM_PYTHON} (set VLLM_PYTHON): run scripts/setup_vllm_cpu.sh")
    probe = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:  # e.g. the project venv whose torch it borrows was rebuilt elsewhere
        pytest.skip(f"vLLM at {VLLM_PYTHON} does not import: {probe.stderr.strip().splitlines()[-1:]}; "
                    "rerun scripts/setup_vllm_cpu.sh")
    from areal.rollout import Engine, SamplingParams

    _, out = exported
    n, prompt = 12, tokenizer("Q: 12+7=?\nA: ")["input_ids"]
    areal = Engine(str(out), num_blocks=32, block_size=16).generate(
        [prompt], SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True))[0].token_ids
    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1",
               OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(VLLM_PYTHON), str(script), str(out), json.dumps(prompt), str(n)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("VLLM_TOKENS ")][-1]
    assert json.loads(line.removeprefix("VLLM_TOKENS ")) == list(areal)
