"""The lm-evaluation-harness backend `tidar_jax` (tidar_jax/evals/harness.py) through lm-eval's own CLI.

One module-scoped run of `python -m tidar_jax.evals.lm_eval_cli` (in-process) evaluates three small local tasks
written here (json datasets through `dataset_path: json` + `dataset_kwargs.data_files`), one per request kind:
multiple_choice (loglikelihood, one question longer than the context window), generate_until, and
loglikelihood_rolling (a document several windows long). The logged samples are then checked against references
computed in this file from the model's params directly: one causal forward per sequence for the log-likelihoods
(the rolling windows rebuilt by hand from lm-eval's documented rule), and greedy AR decoding by full recomputation
for the generations, which the backend produces with TiDAR (identical at beta = 1, greedy). The reference forward
runs jitted at one fixed length REF_LEN, sequences right-padded (causal: padding after position t cannot change
position t, which one test checks against an unpadded forward), so it compiles once.
"""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval")

from tidar_jax.checkpoint.inference import save_inference_checkpoint  # noqa: E402
from tidar_jax.config import replace  # noqa: E402
from tidar_jax.data.tokenizer import Tokenizer, train_bpe  # noqa: E402
from tidar_jax.layout import masks  # noqa: E402
from tidar_jax.model.transformer import create_model, forward  # noqa: E402

MAX_LENGTH = 32   # the backend's context window (model_args max_length)
MAX_GEN = 6
REF_LEN = 48
UNTIL = ["\n\n"]

MC_DOCS = [  # the task's target_delimiter is "", so choices carry their own leading space
    {"question": "The market opened", "choices": [" higher today", " lower", " at noon"], "answer": 0},
    {"question": "Parsing arguments with argparse is", "choices": [" easy", " hard"], "answer": 1},
    {"question": " ".join(["a long question that keeps going and going"] * 6) + " until it ends",  # > MAX_LENGTH
     "choices": [" here", " there"], "answer": 0},
]  # + one whose first choice is the model's own greedy continuation, added by the fixture
GREEDY_QUESTION = "def parse(self"
GEN_DOCS = [{"prompt": "def parse(self", "target": "x"}, {"prompt": "import os\n", "target": "y"},
            {"prompt": "class Action", "target": "z"}]
ROLL_DOCS = [{"text": "A short document."},
             {"text": "This document is several context windows long, so that the rolling log-likelihood has to "
                      "cut it into disjoint windows and give the last one a full context. " * 2}]


def _task_yaml(name, data, body):
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


@pytest.fixture(scope="module")
def run(tiny_config, tmp_path_factory):
    """Writes a random tiny checkpoint and the tasks, runs the lm-eval CLI wrapper once; returns what tests need."""
    root = tmp_path_factory.mktemp("lm_eval")
    cfg = replace(tiny_config, decode={"max_cache_len": 64, "prompt_buckets": (16, 32)})
    params = nnx.split(create_model(cfg.model, seed=3))[1]
    source = open(os.path.join(os.path.dirname(os.__file__), "argparse.py")).read()
    train_bpe([source, json.dumps(MC_DOCS + GEN_DOCS + ROLL_DOCS)], cfg.model.vocab_size, root / "bpe.json")
    save_inference_checkpoint(root / "run", cfg, params, tokenizer_file=root / "bpe.json")
    tokenizer = Tokenizer.from_file(root / "bpe.json")
    graphdef = nnx.graphdef(create_model(cfg.model))
    ref = jax.jit(lambda p, t: jax.nn.log_softmax(
        forward(graphdef, p, t, jnp.arange(REF_LEN)[None], masks.causal_mask(REF_LEN)[None])[0][0], axis=-1))
    refs = {"cfg": cfg, "graphdef": graphdef, "params": params, "tokenizer": tokenizer, "ref": ref}
    greedy = _greedy(refs, tokenizer.encode(GREEDY_QUESTION), 3)
    mc_docs = MC_DOCS + [{"question": GREEDY_QUESTION, "choices": [tokenizer.decode(greedy), " nope"], "answer": 0}]

    tasks = root / "tasks"
    tasks.mkdir()
    for name, docs in (("mc", mc_docs), ("gen", GEN_DOCS), ("roll", ROLL_DOCS)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "mc.yaml").write_text(_task_yaml("tidar_mc", tasks / "mc.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n")))
    (tasks / "gen.yaml").write_text(_task_yaml("tidar_gen", tasks / "gen.jsonl", (
        "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
        f"generation_kwargs:\n  until: {json.dumps(UNTIL)}\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")))
    (tasks / "roll.yaml").write_text(_task_yaml("tidar_roll", tasks / "roll.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")))

    from lm_eval.tasks import TaskManager

    from tidar_jax.evals import lm_eval_cli

    out = root / "results"
    original_init = TaskManager.__init__

    def local_tasks_only(self, *args, **kwargs):  # skip indexing lm-eval's ~15k built-in task files (~10 s)
        kwargs["include_defaults"] = False
        original_init(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TaskManager, "__init__", local_tasks_only)
        mp.setattr("lm_eval.evaluator.add_env_info", lambda results: None)  # imports torch, probes GPUs (~7 s)
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf-datasets"))
        lm_eval_cli.main(["--model", "tidar_jax", "--model_args",
                          f"checkpoint={root / 'run'},max_length={MAX_LENGTH},batch_size=2",
                          "--include_path", str(tasks), "--tasks", "tidar_mc,tidar_gen,tidar_roll",
                          "--output_path", str(out), "--log_samples", "--seed", "0,0,None,0"])
    results = json.loads(open(glob.glob(str(out / "**" / "results_*.json"), recursive=True)[0]).read())
    samples = {}
    for path in glob.glob(str(out / "**" / "samples_*.jsonl"), recursive=True):
        task = os.path.basename(path).split("samples_")[1].rsplit("_", 1)[0]
        samples[task] = sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])
    return {**refs, "results": results, "samples": samples, "mc_docs": mc_docs}


def _log_probs(run, inputs):
    """log_softmax of a causal forward over `inputs`: [len(inputs), vocab]."""
    assert len(inputs) <= REF_LEN
    tokens = np.full((1, REF_LEN), run["cfg"].model.pad_token_id, np.int32)
    tokens[0, :len(inputs)] = inputs
    return np.asarray(run["ref"](run["params"], tokens))[:len(inputs)]


def _greedy(run, ids, max_new, stops=()):
    """Greedy AR continuation by full recomputation (one forward over prompt + tokens so far per new token)."""
    eos, new = run["cfg"].model.eos_token_id, []
    for _ in range(max_new):
        nxt = int(np.argmax(_log_probs(run, ids + new)[-1]))
        new.append(nxt)
        text = run["tokenizer"].decode([t for t in new if t != eos], skip_special_tokens=True)
        if nxt == eos or any(s in text for s in stops):
            break
    return new[:new.index(eos)] if eos in new else new


def test_reference_forward_is_the_unpadded_forward(run):
    inputs = run["tokenizer"].encode("def parse(self, args=None):")
    n = len(inputs)
    logits, _ = forward(run["graphdef"], run["params"], jnp.asarray([inputs], jnp.int32), jnp.arange(n)[None],
                        masks.causal_mask(n)[None])
    np.testing.assert_allclose(_log_probs(run, inputs), jax.nn.log_softmax(logits[0], axis=-1), rtol=1e-5,
                               atol=1e-5)


def _score(run, context, continuation):
    """(sum log p(continuation | context), greedy) on the last MAX_LENGTH + 1 tokens, as the harness defines it."""
    whole = (context + continuation)[-(MAX_LENGTH + 1):]
    logp = _log_probs(run, whole[:-1])
    scored = range(len(whole) - 1 - len(continuation), len(whole) - 1)
    total = sum(float(logp[t, whole[t + 1]]) for t in scored)
    return total, all(int(np.argmax(logp[t])) == whole[t + 1] for t in scored)


def test_backend_is_registered_and_reports_itself(run):
    from lm_eval.api.registry import get_model, model_registry

    from tidar_jax.evals.harness import TidarLM

    assert get_model("tidar_jax") is TidarLM and "hf" in model_registry  # lm-eval's own models still there
    info = run["results"]["config"]["tidar_jax"]
    assert info["mode"] == "tidar" and info["max_length"] == MAX_LENGTH and info["batch_size"] == 2
    assert 1.0 <= info["generation"]["tokens_per_forward"] <= run["cfg"].model.block_size
    assert set(run["results"]["results"]) == {"tidar_mc", "tidar_gen", "tidar_roll"}
    with pytest.raises(ValueError, match="checkpoint=DIR"):
        TidarLM.create_from_arg_string("mode=tidar")


def test_multiple_choice_loglikelihoods_match_a_direct_forward(run):
    tok = run["tokenizer"]
    samples = run["samples"]["tidar_mc"]
    assert len(samples) == len(run["mc_docs"])
    assert len(tok.encode(MC_DOCS[2]["question"])) > MAX_LENGTH  # the long question is left-truncated
    flags = []
    for sample, doc in zip(samples, run["mc_docs"]):
        expected = []
        for choice in doc["choices"]:
            whole, ctx = tok.encode(doc["question"] + choice), tok.encode(doc["question"])  # TemplateLM's split
            expected.append(_score(run, ctx, whole[len(ctx):]))
        got = [(float(r[0][0]), str(r[0][1]) == "True") for r in sample["resps"]]  # logged as strings
        assert [g[1] for g in got] == [e[1] for e in expected]
        flags += [g[1] for g in got]
        np.testing.assert_allclose([g[0] for g in got], [e[0] for e in expected], rtol=1e-5, atol=1e-4)
        assert float(sample["acc"]) == float(int(np.argmax([e[0] for e in expected])) == doc["answer"])
    assert flags[-2:] == [True, False]  # the model's own greedy continuation is flagged greedy


def test_rolling_loglikelihood_matches_hand_built_windows(run):
    tok = run["tokenizer"]
    eos = run["cfg"].model.eos_token_id
    samples = run["samples"]["tidar_roll"]
    lengths = [len(tok.encode(d["text"])) for d in ROLL_DOCS]
    assert lengths[0] < MAX_LENGTH and lengths[1] > 3 * MAX_LENGTH and lengths[1] % MAX_LENGTH
    for sample, doc in zip(samples, ROLL_DOCS):
        tokens = tok.encode(doc["text"])
        total, start = 0.0, 0
        while start < len(tokens):  # windows of MAX_LENGTH predicted tokens; the last one gets a full context
            chunk = tokens[start:start + MAX_LENGTH]
            if start == 0:
                context = [eos]
            elif len(chunk) == MAX_LENGTH:
                context = [tokens[start - 1]]
            else:
                context = tokens[max(len(tokens) - MAX_LENGTH - 1, 0):start]
            total += _score(run, context, chunk)[0]
            start += len(chunk)
        assert float(sample["resps"][0][0]) == pytest.approx(total, rel=1e-5, abs=1e-3)


def test_generate_until_equals_greedy_ar_by_recomputation(run):
    tok = run["tokenizer"]
    samples = run["samples"]["tidar_gen"]
    assert len(samples) == len(GEN_DOCS)
    for sample, doc in zip(samples, GEN_DOCS):
        expected = tok.decode(_greedy(run, tok.encode(doc["prompt"]), MAX_GEN, UNTIL), skip_special_tokens=True)
        for s in UNTIL:
            expected = expected.split(s, 1)[0]
        assert sample["resps"][0][0] == expected
        assert sample["arguments"]["gen_args_0"]["arg_1"]["until"] == UNTIL



def test_generation_limits_are_bounded_by_the_cache(tiny_config, caplog):
    """A task's max_gen_toks never grows the KV cache past decode.max_cache_len: it is cut, with a warning, to what
    the cache leaves after max_length prompt tokens and two blocks; no room at all is refused by name."""
    from types import SimpleNamespace

    from tidar_jax.evals.harness import TidarLM

    cfg = replace(tiny_config, decode={"max_cache_len": 64, "prompt_buckets": (16, 32)})  # K = 4
    lm = SimpleNamespace(config=cfg, _max_length=MAX_LENGTH)
    assert TidarLM._bounded(lm, MAX_GEN) == MAX_GEN and not caplog.records
    assert TidarLM._bounded(lm, 100000) == 64 - MAX_LENGTH - 2 * 4
    assert "max_gen_toks 100000 cut to 24" in caplog.text
    with pytest.raises(ValueError, match="max_length 60 tokens leave no room to generate"):
        TidarLM._bounded(SimpleNamespace(config=cfg, _max_length=60), 1)
