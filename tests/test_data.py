"""SFT data: formats, templates, column mapping, validation messages, length policy. No model needed."""

from __future__ import annotations

import csv
import json
import re

import pytest

from pipeline.builtin.prompt_templates import ALPACA_PROMPT_NO_INPUT, alpaca_prompt
from pipeline.config import DataSource
from pipeline.data.sft import Example, apply_length_policy, load_sft_examples
from pipeline.util.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def src(path, **kw):
    return DataSource(path=str(path), **kw)


def test_alpaca_template_matches_stanford_release():
    with_input = alpaca_prompt("Translate.", "bonjour")
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate.\n\n### Input:\nbonjour\n\n### Response:"
    )
    assert alpaca_prompt("Say hi.", "") == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert "### Input:" not in alpaca_prompt("Say hi.", "   ")


def test_alpaca_rows_become_prompt_completion_and_keep_metadata(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Add.", "input": "2 and 3", "output": "5", "answer": "5"},
            {"instruction": "Say hi.", "output": "Hi."},  # input optional
        ],
    )
    examples, fmt = load_sft_examples(src(path), "alpaca")
    assert fmt == "alpaca"
    assert examples[0].prompt.endswith("### Input:\n2 and 3\n\n### Response:")
    assert examples[0].completion == "5"
    assert examples[0].meta == {"answer": "5"}
    assert "### Input" not in examples[1].prompt


def test_chat_template_renders_messages(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "2 and 3", "output": "5"}])
    (ex,), _ = load_sft_examples(src(path), "chat")
    assert ex.prompt == [{"role": "user", "content": "Add.\n\n2 and 3"}]
    assert ex.completion == [{"role": "assistant", "content": "5"}]


def test_messages_format(tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                ]
            }
        ],
    )
    (ex,), fmt = load_sft_examples(src(path), "chat")
    assert fmt == "messages" and len(ex.prompt) == 2 and ex.completion[0]["content"] == "Hello."


def test_column_mapping_csv_and_parquet(tmp_path):
    path = tmp_path / "q.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "context", "answer"])
        w.writerow(["What is 2+2?", "", "4"])
    mapping = {"instruction": "question", "input": "context", "output": "answer"}
    (ex,), fmt = load_sft_examples(src(path, columns=mapping), "alpaca")
    assert fmt == "alpaca" and ex.completion == "4" and "What is 2+2?" in ex.prompt

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "completion": "c"}]), tmp_path / "pc.parquet")
    (ex,), fmt = load_sft_examples(src(tmp_path / "pc.parquet"), "alpaca")
    assert fmt == "prompt_completion" and (ex.prompt, ex.completion) == ("p", "c")


def test_json_list_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "i", "input": "", "output": "o"}] * 3))
    examples, _ = load_sft_examples(src(path, limit=2), "alpaca")
    assert len(examples) == 2


BAD_DATA = [
    (
        "missing_output",
        [{"instruction": "i", "input": ""}],
        {},
        [r"cannot tell the data format", r"columns: \{instruction: question"],
    ),
    (
        "declared_missing",
        [{"instruction": "i", "response": "r"}],
        {"format": "alpaca"},
        [r"needs column\(s\) 'output'", r"response"],
    ),
    (
        "empty_output",
        [{"instruction": "i", "output": "ok"}, {"instruction": "i", "output": "  "}],
        {},
        [r"row 2 \(line 2\): 'output' is empty"],
    ),
    ("empty_instruction", [{"instruction": "", "output": "o"}], {}, [r"row 1 \(line 1\): 'instruction' is empty"]),
    ("non_string", [{"instruction": "i", "output": 42}], {}, [r"row 1 \(line 1\): 'output' must be a string, got int"]),
    ("null_instruction", [{"instruction": None, "output": "o"}], {}, [r"'instruction' is missing"]),
    (
        "bad_mapping",
        [{"q": "i", "a": "o"}],
        {"columns": {"instruction": "question", "output": "a"}},
        [r"instruction: 'question'", r"columns found: a, q"],
    ),
    (
        "messages_last_user",
        [{"messages": [{"role": "user", "content": "hi"}]}],
        {},
        [r"last message must be the assistant's"],
    ),
    (
        "messages_bad_role",
        [{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
        {},
        [r"messages\[0\]\.role is 'human'"],
    ),
]


@pytest.mark.parametrize("name,rows,kw,patterns", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_messages_name_file_and_row(tmp_path, name, rows, kw, patterns):
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    template = "chat" if "messages" in name else "alpaca"
    with pytest.raises(DataError) as info:
        load_sft_examples(src(path, **kw), template)
    message = str(info.value)
    assert f"{name}.jsonl" in message
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in:\n{message}"


def test_invalid_json_line_and_wrong_shape(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "i", "output": "o"}\n{"instruction": "i", "output": \n[1, 2]\n')
    with pytest.raises(
        DataError, match=r"broken\.jsonl line 2: invalid JSON[\s\S]*broken\.jsonl line 3: expected a JSON object"
    ):
        load_sft_examples(src(path), "alpaca")
    path = tmp_path / "obj.json"
    path.write_text('"just a string"')
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON list of objects"):
        load_sft_examples(src(path), "alpaca")


def test_missing_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl"):
        load_sft_examples(src(tmp_path / "nope.jsonl"), "alpaca")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        load_sft_examples(src(tmp_path / "empty.jsonl"), "alpaca")
    (tmp_path / "latin.csv").write_bytes("instruction,output\ncaf\xe9,o\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv: not UTF-8"):
        load_sft_examples(src(tmp_path / "latin.csv"), "alpaca")


def test_messages_need_chat_template(tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    with pytest.raises(DataError, match="set 'template: chat'"):
        load_sft_examples(src(path), "alpaca")


def test_many_bad_rows_are_summarised(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"instruction": "i", "output": ""}] * 25)
    with pytest.raises(DataError, match=r"25 bad row\(s\)[\s\S]*and 15 more"):
        load_sft_examples(src(path), "alpaca")


def _examples(lengths):
    return [Example(prompt="p" * p, completion="c" * (t - p), where=f"row {i + 1}") for i, (p, t) in enumerate(lengths)]


def count(ex):
    return len(ex.prompt), len(ex.prompt) + len(ex.completion)


def test_length_policy_truncate_drop_error():
    lengths = [(5, 10), (5, 30), (25, 40), (5, 10)]
    kept, rep = apply_length_policy(_examples(lengths), count, 20, "truncate", "f.jsonl")
    assert (len(kept), rep.truncated, rep.dropped_prompt_too_long, rep.dropped_overlength) == (3, 1, 1, 0)
    assert rep.duplicates == 1  # rows 1 and 4 are identical
    assert rep.token_lengths["max"] == 40 and rep.token_lengths["p50"] in (10.0, 30.0)

    kept, rep = apply_length_policy(_examples(lengths), count, 20, "drop", "f.jsonl")
    assert (len(kept), rep.dropped_overlength, rep.truncated) == (2, 2, 0)

    with pytest.raises(DataError, match=r"2 row\(s\) of f\.jsonl are longer than max_length=20[\s\S]*row 2: 30 tokens"):
        apply_length_policy(_examples(lengths), count, 20, "error", "f.jsonl")

    with pytest.raises(DataError, match="no rows left"):
        apply_length_policy(_examples([(30, 40)]), count, 20, "drop", "f.jsonl")


# --------------------------------------------------------------------------------------------
# Files as other tools write them: compressed, byte-order marks, CRLF, blank lines, JSON Lines named .json
# --------------------------------------------------------------------------------------------

ROWS = [{"instruction": "Add 1 and 2.", "output": "3"}, {"instruction": "Say hi, café.", "output": "hi"}]
JSONL = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)


def _zstd(data: bytes) -> bytes:
    import pyarrow as pa

    return pa.Codec("zstd").compress(data, asbytes=True)


def _writers():
    import bz2
    import gzip
    import lzma

    def datasets_to(method, name, **kw):
        def write(tmp_path):
            import datasets

            path = tmp_path / name
            getattr(datasets.Dataset.from_list(ROWS), method)(str(path), **kw)
            return path

        return write

    def pandas_to(method, name, **kw):
        def write(tmp_path):
            import pandas as pd

            path = tmp_path / name
            getattr(pd.DataFrame(ROWS), method)(path, **kw)
            return path

        return write

    def raw(name, data: bytes):
        def write(tmp_path):
            (tmp_path / name).write_bytes(data)
            return tmp_path / name

        return write

    excel_csv = "\ufeffinstruction;output\r\n" + "".join(f"{r['instruction']};{r['output']}\r\n" for r in ROWS)
    return {
        "jsonl.gz (HH-RLHF)": raw("train.jsonl.gz", gzip.compress(JSONL.encode())),
        "jsonl.bz2": raw("train.jsonl.bz2", bz2.compress(JSONL.encode())),
        "jsonl.xz": raw("train.jsonl.xz", lzma.compress(JSONL.encode())),
        "jsonl.zst": raw("train.jsonl.zst", _zstd(JSONL.encode())),
        "gzip named .jsonl": raw("train.jsonl", gzip.compress(JSONL.encode())),
        "utf-8 BOM": raw("bom.jsonl", b"\xef\xbb\xbf" + JSONL.encode()),
        "CRLF": raw("crlf.jsonl", JSONL.replace("\n", "\r\n").encode()),
        "blank lines and no final newline": raw("blank.jsonl", ("\n" + JSONL.replace("\n", "\n\n")).rstrip().encode()),
        "UTF-16 with BOM (PowerShell)": raw("ps.jsonl", JSONL.encode("utf-16")),
        "JSON list named .jsonl": raw("list.jsonl", json.dumps(ROWS, indent=2).encode()),
        ".ndjson": raw("train.ndjson", JSONL.encode()),
        "json.gz list": raw("train.json.gz", gzip.compress(json.dumps(ROWS).encode())),
        "datasets to_json (JSON Lines named .json)": datasets_to("to_json", "ds.json"),
        "datasets to_json gzip": datasets_to("to_json", "ds.jsonl.gz", compression="gzip"),
        "datasets to_csv": datasets_to("to_csv", "ds.csv"),
        "datasets to_parquet": datasets_to("to_parquet", "ds.parquet"),
        "pandas to_json records": pandas_to("to_json", "pd.json", orient="records", force_ascii=False),
        "pandas to_json lines": pandas_to("to_json", "pd.jsonl", orient="records", lines=True),
        "pandas to_csv gzip": pandas_to("to_csv", "pd.csv.gz", index=False),
        "Excel csv (BOM, ';', CRLF)": raw("excel.csv", excel_csv.encode()),
        "tsv": raw(
            "train.tsv",
            ("instruction\toutput\n" + "".join(f"{r['instruction']}\t{r['output']}\n" for r in ROWS)).encode(),
        ),
    }


WRITERS = _writers()


@pytest.mark.parametrize("how", list(WRITERS))
def test_files_written_by_other_tools_are_read(tmp_path, how):
    from pipeline.data.sources import read_file

    path = WRITERS[how](tmp_path)
    rows = read_file(path)
    assert [{k: r[k] for k in ("instruction", "output")} for r in rows.rows] == ROWS
    examples, fmt = load_sft_examples(src(path), "alpaca")
    assert fmt == "alpaca" and [e.completion.strip() for e in examples] == ["3", "hi"]


def test_row_numbers_survive_compression_boms_and_blank_lines(tmp_path):
    import gzip

    bad = JSONL.replace("\n", "\r\n") + "\r\n" + '{"instruction": "x", ' + "\r\n"
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(b"\xef\xbb\xbf" + bad.encode()))
    with pytest.raises(DataError, match=re.escape(f"{path} line 4: invalid JSON")):
        load_sft_examples(src(path), "alpaca")
    empty = tmp_path / "two.jsonl"
    empty.write_text('\n{"instruction": "a", "output": ""}\n')
    with pytest.raises(DataError, match=re.escape(f"{empty} row 1 (line 2)")):
        load_sft_examples(src(empty), "alpaca")


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        (
            "cut.jsonl.gz",
            lambda: __import__("gzip").compress(JSONL.encode() * 40)[:-25],
            "cannot decompress it as gzip",
        ),
        ("bad.jsonl.xz", lambda: b"\xfd7zXZ\x00 not xz", "cannot decompress it as xz"),
        ("bad.jsonl.zst", lambda: b"\x28\xb5\x2f\xfd broken", "cannot decompress it as zstd"),
        (
            "lfs.jsonl",
            lambda: b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n",
            "Git LFS pointer",
        ),
        (
            "cols.json",
            lambda: json.dumps({"instruction": {"0": "a"}, "output": {"0": "b"}}).encode(),
            "orient='records'",
        ),
        (
            "latin1.jsonl.gz",
            lambda: __import__("gzip").compress('{"instruction": "caf\xe9"}\n'.encode("latin-1")),
            "not UTF-8",
        ),
    ],
)
def test_damaged_or_misnamed_files_say_what_they_are(tmp_path, name, content, pattern):
    from pipeline.data.sources import read_file

    path = tmp_path / name
    path.write_bytes(content())
    with pytest.raises(DataError, match=re.escape(pattern)) as info:
        read_file(path)
    assert str(path) in str(info.value)


def test_a_directory_is_not_a_data_file(tmp_path):
    from pipeline.data.sources import read_file

    folder = tmp_path / "rows.jsonl"
    folder.mkdir()
    with pytest.raises(DataError, match="is a directory, not a data file"):
        read_file(folder)
