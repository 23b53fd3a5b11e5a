"""Times as logs write them: epoch numbers, ISO-8601, or a format guessed from the cells (US month
first, day first, calendar numbers, month names) or given as ``time_format``."""

import tomllib

import numpy as np
import pyarrow as pa
import pytest

from streams.events import SchemaError
from streams.log_cells import parse_times, time_format_of
from streams.log_reader import encode_log
from streams.log_schema import LogSchema


@pytest.mark.parametrize("cells,fmt", [
    (["11/9/2019 12:00:27 AM", "11/9/2019 1:03:54 PM"], "%m/%d/%Y %I:%M:%S %p"),  # MIND
    (["12/1/2009 7:45", "12/13/2010 17:45"], "%m/%d/%Y %H:%M"),  # UCI Online Retail
    (["24/11/2019", "1/12/2019"], "%d/%m/%Y"),  # a day above 12: day first
    (["24.11.2019 18:30", "1.12.2019 09:05"], "%d.%m.%Y %H:%M"),
    (["20220408", "20220409"], "%Y%m%d"),  # KuaiRand's date
    (["14102100", "14102123"], "%y%m%d%H"),  # Avazu's hour
    (["1588687728923", "1588687728924"], ""),  # epoch ms
    (["2019-11-24T00:00:34Z", "2019-11-24 10:00:00"], ""),  # ISO-8601
    (["829", "1103"], ""),  # Tmall's month and day: no date, but in order
    (["soon", "later"], None),
])
def test_time_formats_are_recognised(cells, fmt):
    assert time_format_of(pa.array(cells)) == fmt


def test_a_time_format_reads_its_cells_and_names_the_ones_that_do_not_fit(tmp_path):
    ms, empty, bad = parse_times(pa.array(["11/9/2019 1:00:00 PM", None, "2019-11-09"]), "%m/%d/%Y %I:%M:%S %p")
    assert ms[0] == np.datetime64("2019-11-09T13:00:00", "ms").astype(np.int64)
    assert empty.tolist() == [False, True, False] and bad.tolist() == [False, False, True]
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,label,ts\na,x,1,12/1/2009 7:45\nb,y,0,2009-12-01\n")
    schema = LogSchema(time_format="%m/%d/%Y %H:%M")
    with pytest.raises(SchemaError, match="line 3.*does not parse as '%m/%d/%Y %H:%M'"):
        encode_log(path, schema)
    with pytest.raises(SchemaError, match="strptime"):
        LogSchema(time_format="MM/DD/YYYY")
    assert LogSchema.from_mapping(tomllib.loads(schema.to_toml())) == schema


@pytest.mark.parametrize("cells,fmt", [
    (["Tue Apr 03 18:00:09 +0000 2012", "Wed Apr 04 01:02:03 +0000 2012"], "%a %b %d %H:%M:%S %z %Y"),
    (["01-Jan-1995", "14-Feb-1996"], "%d-%b-%Y"),
    (["09 13, 2009", "10 1, 2010"], "%m %d, %Y"),
])
def test_times_with_month_names(cells, fmt):
    assert time_format_of(pa.array(cells)) == fmt
    ms, _, bad = parse_times(pa.array(cells), fmt)
    assert not bad.any() and ms[0] < ms[1]
