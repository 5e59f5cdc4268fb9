"""Data pipeline: corpora, held-out split, packing, seeded shuffle, per-process sharding, exact resume, errors.

References are plain Python: encode each document, append eos, concatenate, chunk into seq_len.
"""

import sys

import numpy as np
import pytest
from test_tokenizer import synthetic_docs  # tests/ is on sys.path under pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tidar_jax.config import ConfigError, DataConfig, replace
from tidar_jax.data import pipeline
from tidar_jax.data.corpora import DataError, load_corpus_documents, split_documents
from tidar_jax.data.tokenizer import Tokenizer, train_bpe

SEQ, BATCH = 16, 6


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    cache = tmp_path / "token-cache"
    monkeypatch.setenv("TIDAR_JAX_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def docs():
    return synthetic_docs(n_docs=40, seed=3)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, docs):
    root = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(docs):
        (root / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tokenizer(docs, tmp_path_factory):
    return train_bpe(docs, 512, tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture
def cfg(tiny_config, corpus_dir):
    return replace(tiny_config, data={"corpus": "files", "paths": (str(corpus_dir),), "seq_len": SEQ,
                                      "global_batch_size": BATCH, "holdout_fraction": 0.1, "seed": 7})


def reference_examples(docs, tokenizer, seq_len):
    stream = []
    for doc in docs:
        stream += tokenizer.encode(doc) + [tokenizer.eos_id]
    return [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)], stream


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


# ---------------------------------------------------------------- corpora and split

def test_file_formats_give_one_document_per_file_line_or_row(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("first doc\nwith two lines\n")
    (tmp_path / "blank.txt").write_text("  \n")
    (tmp_path / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "third", "id": 3}\n')
    (tmp_path / "ignored.md").write_text("not a corpus file")
    docs = load_corpus_documents(DataConfig(corpus="files", paths=(str(tmp_path),)))
    assert docs == ["first doc\nwith two lines\n", "second", "third"]
    (tmp_path / "c.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import fails as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="c.parquet needs pyarrow, which is not installed"):
        load_corpus_documents(DataConfig(corpus="files", paths=(str(tmp_path / "c.parquet"),)))


@pytest.mark.parametrize("setup, message", [
    (lambda p: ("nope", ()), "unknown corpus 'nope'"),
    (lambda p: ("files", ()), "data.paths is empty"),
    (lambda p: ("files", (str(p / "missing.txt"),)), "data file not found: .*missing.txt"),
    (lambda p: ("files", (str(p / "x.csv"),)), "unsupported suffix '.csv'"),
    (lambda p: ("files", (str(p / "empty"),)), "holds no .txt/.jsonl/.parquet files"),
    (lambda p: ("files", (str(p / "blank.txt"),)), "contains no non-empty documents"),
    (lambda p: ("files", (str(p / "bad.jsonl"),)), "bad.jsonl:2 has neither a token-id list \"ids\" nor a string field \"text\""),
    (lambda p: ("files", (str(p / "latin1.txt"),)), "latin1.txt is not valid UTF-8"),
])
def test_corpus_errors_name_the_problem(tmp_path, setup, message):
    (tmp_path / "x.csv").write_text("a,b")
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    corpus, paths = setup(tmp_path)
    with pytest.raises(DataError, match=message):
        load_corpus_documents(DataConfig(corpus=corpus, paths=paths))


def test_split_is_disjoint_deterministic_and_seeded(docs):
    train, held = split_documents(docs, 0.1, seed=7)
    assert len(held) == 4 and len(train) == len(docs) - 4
    assert sorted(train + held) == sorted(docs)
    assert not set(train) & set(held)
    assert train == [d for d in docs if d in set(train)]  # original order kept
    assert split_documents(docs, 0.1, seed=7) == (train, held)
    assert split_documents(docs, 0.1, seed=8)[1] != held
    assert len(split_documents(docs[:3], 0.01, seed=0)[1]) == 1  # at least one document held out
    with pytest.raises(DataError, match="at least 2 documents"):
        split_documents(docs[:1], 0.1, seed=0)


# ---------------------------------------------------------------- packing

def test_packing_matches_plain_concatenation_and_chunking(cfg, docs, tokenizer):
    train_docs, _ = split_documents(docs, 0.1, seed=7)
    want, want_stream = reference_examples(train_docs, tokenizer, SEQ)
    stream = pipeline.split_token_stream(cfg, tokenizer, "train")
    assert stream.tolist() == want_stream
    assert int(np.sum(stream == tokenizer.eos_id)) == len(train_docs)
    assert pipeline.pack_examples(stream, SEQ).tolist() == want
    # One epoch of the iterator yields each packed example exactly once (in a shuffled order).
    n = len(want)
    rows = np.concatenate([b["tokens"] for b in take(pipeline.make_train_iterator(cfg, tokenizer), n // BATCH + 1)])
    assert sorted(rows[:n].tolist()) == sorted(want)
    assert rows[:n].tolist() != want
    batch = pipeline.make_train_iterator(cfg, tokenizer).__next__()
    assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (BATCH, SEQ)
    assert batch["valid"].dtype == np.bool_ and batch["valid"].all()


def test_token_cache_is_reused_and_keyed_by_text(cfg, tokenizer, token_cache, monkeypatch, corpus_dir, tmp_path):
    first = pipeline.split_token_stream(cfg, tokenizer, "train")
    assert len(list(token_cache.glob("tokens-*.npy"))) == 1
    monkeypatch.setattr(pipeline, "_encode_stream", lambda *a: pytest.fail("cache miss: re-tokenised"))
    np.testing.assert_array_equal(pipeline.split_token_stream(cfg, tokenizer, "train"), first)
    monkeypatch.undo()
    monkeypatch.setenv("TIDAR_JAX_CACHE_DIR", str(token_cache))
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in corpus_dir.iterdir():
        (changed / path.name).write_text(path.read_text() + " extra")
    other = replace(cfg, data={"paths": (str(changed),)})
    assert len(pipeline.split_token_stream(other, tokenizer, "train")) > len(first)


# ---------------------------------------------------------------- order, sharding, resume

def test_shuffle_is_seeded(cfg, tokenizer):
    def first_batches(c):
        return [b["tokens"].tolist() for b in take(pipeline.make_train_iterator(c, tokenizer), 3)]
    assert first_batches(cfg) == first_batches(cfg)
    # Another seed also moves the held-out split; both change the order.
    assert first_batches(replace(cfg, data={"seed": 8})) != first_batches(cfg)


def test_epochs_reshuffle(cfg, tokenizer):
    n = len(pipeline.pack_examples(pipeline.split_token_stream(cfg, tokenizer, "train"), SEQ))
    rows = np.concatenate([b["tokens"] for b in take(pipeline.make_train_iterator(cfg, tokenizer), -(-2 * n // BATCH))])
    epoch0, epoch1 = rows[:n].tolist(), rows[n:2 * n].tolist()
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_shards_union_is_the_global_batch(cfg, tokenizer, process_count):
    global_batches = take(pipeline.make_train_iterator(cfg, tokenizer), 4)
    shards = [take(pipeline.make_train_iterator(cfg, tokenizer, p, process_count), 4) for p in range(process_count)]
    for step, global_batch in enumerate(global_batches):
        for p in range(process_count):
            local = shards[p][step]
            assert local["tokens"].shape == (BATCH // process_count, SEQ)
            np.testing.assert_array_equal(local["tokens"], global_batch["tokens"][p::process_count])


def test_resume_gives_exactly_the_next_batch_across_an_epoch_boundary(cfg, tokenizer):
    n = len(pipeline.pack_examples(pipeline.split_token_stream(cfg, tokenizer, "train"), SEQ))
    assert n % BATCH, "the test needs an epoch boundary inside a batch"
    stop = n // BATCH - 1  # the next few batches straddle the end of epoch 0
    for process_index, process_count in [(0, 1), (1, 2)]:
        it = pipeline.make_train_iterator(cfg, tokenizer, process_index, process_count)
        take(it, stop)
        state = it.get_state()
        want = take(it, 4)
        resumed = pipeline.make_train_iterator(cfg, tokenizer, process_index, process_count)
        resumed.set_state(state)
        for got, expected in zip(take(resumed, 4), want):
            np.testing.assert_array_equal(got["tokens"], expected["tokens"])
    # The state counts global batches, so it resumes on another process count too.
    single = pipeline.make_train_iterator(cfg, tokenizer)
    single.set_state(state)
    global_batch = next(single)["tokens"]
    np.testing.assert_array_equal(global_batch[1::2], want[0]["tokens"])


# ---------------------------------------------------------------- evaluation data

def test_eval_batches_are_the_heldout_stream_in_order(cfg, docs, tokenizer):
    _, held_docs = split_documents(docs, 0.1, seed=7)
    _, stream = reference_examples(held_docs, tokenizer, SEQ)
    batches = pipeline.make_eval_batches(cfg, tokenizer, num_batches=100)
    n_batches = -(-len(stream) // (SEQ * BATCH))
    assert len(batches) == n_batches
    tokens = np.concatenate([b["tokens"] for b in batches]).reshape(-1)
    valid = np.concatenate([b["valid"] for b in batches]).reshape(-1)
    assert tokens[valid].tolist() == stream and valid[:len(stream)].all() and not valid[len(stream):].any()
    assert (tokens[len(stream):] == tokenizer.pad_id).all()
    assert len(pipeline.make_eval_batches(cfg, tokenizer, num_batches=1)) == 1
    shard = pipeline.make_eval_batches(cfg, tokenizer, num_batches=100, process_index=1, process_count=3)
    for local, full in zip(shard, batches):
        np.testing.assert_array_equal(local["tokens"], full["tokens"][1::3])
        np.testing.assert_array_equal(local["valid"], full["valid"][1::3])


def test_heldout_prompts_are_windows_of_heldout_documents(cfg, docs, tokenizer):
    _, held_docs = split_documents(docs, 0.1, seed=7)
    encoded = [tokenizer.encode(d) for d in held_docs]
    prompts = pipeline.heldout_prompts(cfg, tokenizer, n=6, prompt_len=12)
    assert len(prompts) == 6 and all(len(p) == 12 for p in prompts)
    assert prompts[:len(held_docs)] == [ids[:12] for ids in encoded if len(ids) >= 12][:6]
    windows = {tuple(ids[i:i + 12]) for ids in encoded for i in range(0, len(ids) - 11, 12)}
    assert all(tuple(p) in windows for p in prompts)
    with pytest.raises(DataError, match="yields only .* prompts of 12 tokens, 1000 requested"):
        pipeline.heldout_prompts(cfg, tokenizer, n=1000, prompt_len=12)


# ---------------------------------------------------------------- tokenizer handling and config checks

def test_load_or_train_tokenizer_trains_then_reuses(cfg, tmp_path, monkeypatch, tokenizer):
    existing = tmp_path / "tokenizer.json"
    trained = pipeline.load_or_train_tokenizer(cfg, existing)
    assert trained.vocab_size == cfg.model.vocab_size and not existing.exists()  # nothing is written
    trained.save(existing)
    monkeypatch.setattr(pipeline, "train_bpe", lambda *a, **k: pytest.fail("retrained instead of reusing"))
    assert pipeline.load_or_train_tokenizer(cfg, existing).fingerprint == trained.fingerprint
    # An explicit data.tokenizer wins over an existing file.
    given = replace(cfg, data={"tokenizer": str(tokenizer.path)})
    assert pipeline.load_or_train_tokenizer(given, existing).fingerprint == tokenizer.fingerprint
    assert trained.fingerprint != tokenizer.fingerprint  # trained on the train split only


def swapped_special_tokenizer(docs):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|pad|>", "<|endoftext|>", "<|mask|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return Tokenizer(hf)


def test_embedding_may_have_unused_rows(cfg, tokenizer):
    # Imported models (Qwen: 151936 rows, 151665 tokens) keep spare embedding rows; that must not be refused.
    batch = next(iter(pipeline.make_train_iterator(replace(cfg, model={"vocab_size": 1024}), tokenizer)))
    assert batch["tokens"].max() < tokenizer.vocab_size


def test_mismatched_tokenizer_is_refused(cfg, docs, tokenizer):
    with pytest.raises(ConfigError, match="has 512 tokens but model.vocab_size is 256"):
        pipeline.make_train_iterator(replace(cfg, model={"vocab_size": 256}), tokenizer)
    with pytest.raises(ConfigError, match="has mask id 2 but model.mask_token_id is 1"):
        pipeline.make_train_iterator(cfg, swapped_special_tokenizer(docs))
    with pytest.raises(ConfigError, match=r"model.eos_token_id \(600\) is not a token of the tokenizer"):
        pipeline.make_eval_batches(replace(cfg, model={"vocab_size": 1024, "eos_token_id": 600}), tokenizer, 1)
    with pytest.raises(ConfigError, match=r"data.separator_token_id \(1\) is not a token"):  # the mask id
        pipeline.make_train_iterator(replace(cfg, data={"separator_token_id": 1}), tokenizer)


def test_too_little_data_and_bad_sharding_are_refused(cfg, tokenizer):
    with pytest.raises(DataError, match="fewer than one global batch needs \\(4096 x 16"):
        pipeline.make_train_iterator(replace(cfg, data={"global_batch_size": 4096}), tokenizer)
    with pytest.raises(DataError, match="global_batch_size \\(6\\) must be divisible by the process count \\(4\\)"):
        pipeline.make_train_iterator(cfg, tokenizer, 0, 4)
    with pytest.raises(DataError, match="process_index 2 must be in"):
        pipeline.make_train_iterator(cfg, tokenizer, 2, 2)


# ---------------------------------------------------------------- the real embedded corpora

@pytest.mark.parametrize("corpus, check", [
    ("bbc-news", lambda docs: len(docs) == 2225 and any("BBC" in d for d in docs)),
    ("shakespeare", lambda docs: len(docs) == 42 and any("To be, or not to be" in d for d in docs)),
    ("python-stdlib", lambda docs: len(docs) > 300 and any("class JSONDecoder(" in d for d in docs)
     and not any("class TestDecode(" in d for d in docs)),  # Lib/test/test_json is excluded
])
def test_embedded_corpora_load_offline(corpus, check):
    docs = load_corpus_documents(DataConfig(corpus=corpus))
    assert check(docs) and all(d.strip() for d in docs)


def test_bbc_news_round_trips_through_a_bpe(tiny_config):
    train_docs, held_docs = split_documents(load_corpus_documents(tiny_config.data), 0.02, seed=0)
    assert len(held_docs) == 44
    tok = train_bpe(train_docs[:300], 512)
    for doc in held_docs:
        ids = tok.encode(doc)
        assert tok.decode(ids) == doc and len(ids) < 0.6 * len(doc.encode())


@pytest.mark.slow
def test_bbc_news_end_to_end(tiny_config, tmp_path):
    tok = pipeline.load_or_train_tokenizer(tiny_config)
    batch = next(pipeline.make_train_iterator(tiny_config, tok))
    assert batch["tokens"].shape == (tiny_config.data.global_batch_size, tiny_config.data.seq_len)
    text = tok.decode(batch["tokens"][0])
    assert sum(ch.isalpha() for ch in text) > 0.5 * len(text)  # real English prose, not noise
    heldout = pipeline.make_eval_batches(tiny_config, tok, 1)[0]
    held_text = tok.decode(heldout["tokens"][0][heldout["valid"][0]])
    _, held_docs = split_documents(load_corpus_documents(tiny_config.data), tiny_config.data.holdout_fraction,
                                   tiny_config.data.seed)
    assert held_docs[0].startswith(held_text.split("<|endoftext|>")[0])


@pytest.mark.slow
def test_multiprocess_workers_give_the_same_batches_and_resume(cfg, tokenizer):
    want = take(pipeline.make_train_iterator(cfg, tokenizer), 6)
    workers = replace(cfg, data={"worker_count": 2})
    it = pipeline.make_train_iterator(workers, tokenizer)
    got = take(it, 3)
    state = it.get_state()
    got += take(it, 3)
    resumed = pipeline.make_train_iterator(workers, tokenizer)
    resumed.set_state(state)
    got += take(resumed, 3)
    it.close()
    resumed.close()
    for g, w in zip(got, want + want[3:]):
        np.testing.assert_array_equal(g["tokens"], w["tokens"])
