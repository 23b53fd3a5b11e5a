"""Log schemas: inference of kinds and sides, the stable feature-id contract, the TOML form."""

import json
import os
import subprocess
import sys
import tomllib

import numpy as np
import pytest
import xxhash

from streams.events import SchemaError
from streams.log_infer import infer_schema
from streams.log_schema import ColumnSpec, LogSchema, entity_ids, feature_ids
from streams.log_stats import inspection_toml
from tests.streams.log_fixtures import write_real_shaped_csv

# A rating log joined with its user and item tables, as people export it: string ids, a
# multi-valued genre cell, a release year with empty cells, user attributes, a constant and an
# all-empty column, and times in three spellings (ISO-8601 with and without zone, epoch s and ms).
RATINGS = """\
user_id,item_id,label,ts,genres,year,age,gender,occupation,source,notes
u1,m1,1,2019-11-24 00:00:34.762830+00:00,Comedy|Romance,1995,25,M,writer,web,
u1,m2,0,2019-11-24T00:01:00Z,Drama,,25,M,writer,web,
u2,m1,0,1574554000,Comedy|Romance,1995,41,F,doctor,web,
u2,m3,1,1574554000,Action|Sci-Fi,1982,41,F,doctor,web,
u3,m4,0,1574554100000,Comedy,2001,33,F,,web,
u3,m1,1,1574554200,Comedy|Romance,1995,33,F,,web,
u4,m2,0,2019-11-24 00:05:00,Drama,,58,M,artist,web,
u4,m5,0,2019-11-24 00:06:00,,1999,58,M,artist,web,
u1,m3,1,1574554500,Action|Sci-Fi,1982,25,M,writer,web,
u2,m4,0,1574554600,Comedy,2001,41,F,doctor,web,
u3,m5,0,1574554700,,1999,33,F,,web,
u4,m1,1,1574554800,Comedy|Romance,1995,58,M,artist,web,
"""


@pytest.fixture
def ratings(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text(RATINGS)
    return path


def kinds(schema: LogSchema) -> dict[str, tuple[str, str]]:
    return {c.name: (c.kind, c.side) for c in schema.columns}


def test_inference_gives_each_column_of_a_rating_log_its_kind_and_side(ratings):
    schema, _ = infer_schema(ratings)
    assert kinds(schema) == {
        "genres": ("multi", "item"), "year": ("numeric", "item"),
        "age": ("numeric", "user"), "gender": ("categorical", "user"),
        "occupation": ("categorical", "user"),
        "source": ("ignore", "item"), "notes": ("ignore", "item")}  # one value / all empty
    assert schema.user_slots() == ("gender", "occupation") and schema.item_slots() == ("genres",)
    assert schema.dense_names() == ("age", "age:missing", "year", "year:missing")
    assert schema.item_dense_width() == 2


def test_inference_counts_rows_values_empties_time_range_and_label_rate(ratings):
    _, stats = infer_schema(ratings)
    assert stats.rows == 12 and stats.bad_rows == 0
    assert stats.label_rate == pytest.approx(5 / 12)
    assert stats.time_min == "2019-11-24T00:00:34.762000+00:00"  # ISO with a zone and a fraction
    assert stats.time_max == "2019-11-24T00:20:00+00:00"  # epoch seconds
    cols = stats.columns
    assert (cols["user_id"].distinct, cols["item_id"].distinct) == (4, 5)
    assert (cols["year"].empty, cols["genres"].empty, cols["occupation"].empty) == (2, 2, 3)
    assert cols["genres"].with_separator == 6 and cols["notes"].empty == 12
    assert not cols["year"].varies_within_item and cols["age"].varies_within_item
    assert not cols["age"].varies_within_user


def test_the_real_shaped_fixture_infers_as_its_docstring_says(tmp_path):
    schema, stats = infer_schema(write_real_shaped_csv(tmp_path / "log.csv"))
    assert kinds(schema) == {
        "genres": ("multi", "item"), "year": ("numeric", "item"), "age": ("numeric", "user"),
        "gender": ("categorical", "user"), "occupation": ("categorical", "user"),
        "device": ("categorical", "user")}
    assert stats.rows == 300 and 0.1 < stats.label_rate < 0.3


def test_small_integer_codes_and_id_columns_are_categorical_not_numeric(tmp_path):
    rows = ["user_id,item_id,label,ts,position,shop_id,price"]
    rows += [f"{i % 7},{i % 11},{i % 2},{1000 + i},{i % 3 + 1},{i % 50},{i * 0.37:.2f}" for i in range(200)]
    path = tmp_path / "codes.csv"
    path.write_text("\n".join(rows) + "\n")
    schema, _ = infer_schema(path)
    assert kinds(schema)["position"][0] == "categorical"  # 3 repeating integers: a code
    assert kinds(schema)["shop_id"][0] == "categorical"  # integers named *_id
    assert kinds(schema)["price"][0] == "numeric"


def test_lists_separated_by_commas_or_semicolons_are_multi_valued_titles_and_decimals_not(tmp_path):
    genres = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi")
    rows = ["user_id,item_id,label,ts,genres,title,price,tags"]
    for i in range(300):
        item = i % 50
        g = ", ".join(genres[(item + k) % 6] for k in range(1 + item % 3))
        title = f"Movie {item}, The" if item % 3 == 0 else f"Movie {item}"
        rows.append(f'{i % 30},{item},{i % 2},{1000 + i},"{g}","{title}","{item},{item % 10}",'
                    f'{genres[i // 2 % 6]};{genres[(i // 2 + 1) % 6]}')  # i // 2: the label (i % 2) is no function of it
    path = tmp_path / "lists.csv"
    path.write_text("\n".join(rows) + "\n")
    schema, _ = infer_schema(path)
    assert (schema.column("genres").kind, schema.column("genres").separator) == ("multi", ",")
    assert (schema.column("tags").kind, schema.column("tags").separator) == ("multi", ";")
    assert schema.column("title").kind == "text"  # a comma inside a title is no list
    assert (schema.column("price").kind, schema.column("price").decimal) == ("numeric", ",")  # no list
    from streams.log_reader import encode_log

    log = encode_log(path, schema)
    first = int(np.flatnonzero(log.item_id == 2)[0])  # item 2: "Drama, Horror, Romance"
    bag = log.sparse["genres"].take(np.array([first])).values.tolist()
    assert bag == feature_ids("genres", ["Drama", "Horror", "Romance"]).tolist()


def test_a_european_export_with_decimal_commas_reads_like_its_decimal_point_twin(tmp_path):
    rows = [(i % 9, i % 13, i % 2, 1_700_000_000 + i, f"{i % 17},{i % 10}" if i % 5 else str(i % 17))
            for i in range(200)]
    euro, plain = tmp_path / "euro.csv", tmp_path / "plain.csv"
    euro.write_text("user_id;item_id;label;ts;price\n" + "".join(f"{u};{it};{y};{t};{p}\n" for u, it, y, t, p in rows))
    plain.write_text("user_id,item_id,label,ts,price\n" + "".join(
        f"{u},{it},{y},{t},{p.replace(',', '.')}\n" for u, it, y, t, p in rows))
    schema, _ = infer_schema(euro)
    assert (schema.column("price").kind, schema.column("price").decimal) == ("numeric", ",")
    (tmp_path / "euro.toml").write_text(schema.to_toml())
    assert LogSchema.from_toml(tmp_path / "euro.toml") == schema
    from streams.log_reader import encode_log

    np.testing.assert_array_equal(encode_log(euro, schema).dense, encode_log(plain, infer_schema(plain)[0]).dense)


def test_schema_file_overrides_win_and_column_names_are_configurable(tmp_path, ratings):
    overrides = LogSchema(columns=(ColumnSpec("year", "categorical", "item"),
                                   ColumnSpec("genres", "multi", "item", pooling="mean"),
                                   ColumnSpec("age", "numeric", "item")))
    schema, _ = infer_schema(ratings, overrides)
    k = kinds(schema)
    assert k["year"] == ("categorical", "item") and k["age"] == ("numeric", "item")
    assert schema.column("genres").pooling == "mean"
    assert k["gender"] == ("categorical", "user")  # not overridden: still inferred
    renamed = tmp_path / "renamed.csv"
    # (names streams.log_names does not know: it finds uid, movie, liked by itself)
    renamed.write_text(RATINGS.replace("user_id,item_id,label,ts", "who,what,verdict,when", 1))
    with pytest.raises(SchemaError, match="missing columns"):
        infer_schema(renamed)
    schema, stats = infer_schema(renamed, user_col="who", item_col="what", label_col="verdict",
                                 time_col="when")
    assert stats.label_rate == pytest.approx(5 / 12) and kinds(schema)["genres"] == ("multi", "item")


def test_feature_ids_follow_the_documented_xxh64_contract():
    ids = feature_ids("genres", ["Comedy", "", "Comedy", "Ñandú"])
    want = [np.uint64(xxhash.xxh64_intdigest(b"genres\x1f" + v.encode(), seed=0)).view(np.int64)
            for v in ("Comedy", "", "Comedy", "Ñandú")]
    assert ids.dtype == np.int64 and ids.tolist() == [int(w) for w in want]
    assert ids[0] == ids[2] and len(set(ids.tolist())) == 3  # the empty cell has its own id
    assert feature_ids("genre", ["Comedy"])[0] != ids[0]  # the slot is part of the id
    assert entity_ids("user_id", ["42", "-3", "u7", "99999999999999999999"]).tolist() == [
        42, -3, int(feature_ids("user_id", ["u7"])[0]),
        int(feature_ids("user_id", ["99999999999999999999"])[0])]  # beyond int64: hashed


def test_feature_ids_are_the_same_in_another_process_with_another_hash_seed():
    values = ["Comedy", "", "writer", "Ñandú", "42"]
    code = ("import json; from streams.log_schema import feature_ids, entity_ids; "
            f"print(json.dumps([feature_ids('genres', {values!r}).tolist(), "
            f"entity_ids('user_id', {values!r}).tolist()]))")
    outs = []
    for seed in ("1", "987654"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, timeout=120, check=True)
        outs.append(json.loads(proc.stdout))
    here = [feature_ids("genres", values).tolist(), entity_ids("user_id", values).tolist()]
    assert outs[0] == outs[1] == here


def test_toml_round_trip_keeps_every_field():
    schema = LogSchema(user_col="uid", item_col="movie", label_col="rating", time_col="when",
                       positive_threshold=4.0,
                       columns=(ColumnSpec("genres", "multi", "item", pooling="mean", separator=";"),
                                ColumnSpec("release year", "numeric", "item"),
                                ColumnSpec('odd "name"', "categorical", "user"),
                                ColumnSpec("blob", "ignore", "user")))
    text = schema.to_toml({"": "a note\nover two lines", "genres": "counts"})
    assert tomllib.loads(text)["columns"]["release year"]["kind"] == "numeric"
    assert LogSchema.from_mapping(tomllib.loads(text)) == schema
    assert LogSchema.from_mapping(tomllib.loads(LogSchema().to_toml())) == LogSchema()


@pytest.mark.parametrize("table, match", [
    ('[columns.genres]\nkind = "bag"\n', "column 'genres': unknown kind 'bag'"),
    ('[columns.year]\nkind = "numeric"\nside = "both"\n', "column 'year': unknown side 'both'"),
    ('[columns.genres]\nkind = "multi"\npooling = "max"\n', "column 'genres': unknown pooling"),
    ('[columns.year]\nside = "item"\n', "column 'year' has no kind"),
    ('[columns.year]\nkind = "numeric"\nscale = 2\n', "column 'year' has unknown keys"),
    ('user_column = "u"\n', "unknown keys"),
])
def test_a_bad_schema_file_is_an_error_naming_the_column(tmp_path, table, match):
    path = tmp_path / "schema.toml"
    path.write_text(table)
    with pytest.raises(SchemaError, match=match):
        LogSchema.from_toml(path)


def test_inspection_is_toml_that_reads_back_as_the_inferred_schema(ratings):
    schema, stats = infer_schema(ratings)
    text = inspection_toml(schema, stats)
    assert "rows 12" in text and "distinct 5, empty 0" in text  # counts ride along as comments
    assert LogSchema.from_mapping(tomllib.loads(text)) == schema


def test_headwater_replay_inspect_prints_a_schema_to_edit_and_pass_back(ratings, tmp_path):
    def hw(*argv):
        return subprocess.run([sys.executable, "-m", "headwater", "replay", *argv],
                              capture_output=True, text=True, timeout=120)

    out = hw("--inspect", str(ratings))
    assert out.returncode == 0, out.stderr
    edited = out.stdout.replace('[columns.year]\nkind = "numeric"', '[columns.year]\nkind = "categorical"')
    assert edited != out.stdout
    schema_file = tmp_path / "schema.toml"
    schema_file.write_text(edited)
    again = hw("--inspect", str(ratings), "--schema", str(schema_file))
    assert again.returncode == 0, again.stderr
    assert kinds(LogSchema.from_mapping(tomllib.loads(again.stdout)))["year"] == ("categorical", "item")
    schema_file.write_text(edited.replace('kind = "categorical"', 'kind = "image"', 1))
    bad = hw("--inspect", str(ratings), "--schema", str(schema_file))
    assert bad.returncode == 2 and "column 'year': unknown kind 'image'" in bad.stderr
