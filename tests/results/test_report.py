import base64
import re

import numpy as np
import pytest

from results.report import SECTION_IDS, expected_calibration_error, write_report

FIGURE_SECTIONS = ("roc-pr", "learning-curves", "factors", "parallel-coordinates", "calibration")


def _sections(document: str) -> dict[str, str]:
    found = re.findall(r'<section id="([^"]+)">(.*?)</section>', document, flags=re.DOTALL)
    return dict(found)


@pytest.fixture(scope="module")
def evaluated_report(evaluated_run, tmp_path_factory) -> str:
    path = write_report(evaluated_run, output=tmp_path_factory.mktemp("report") / "report.html", top=2)
    return path.read_text(encoding="utf-8")


def test_write_report_has_every_section(evaluated_report):
    sections = _sections(evaluated_report)

    assert list(sections) == list(SECTION_IDS)


@pytest.mark.parametrize("section_id", FIGURE_SECTIONS)
def test_write_report_embeds_png_figure(evaluated_report, section_id):
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', _sections(evaluated_report)[section_id])

    assert len(images) == 1
    assert base64.b64decode(images[0]).startswith(b"\x89PNG\r\n\x1a\n")


def test_write_report_is_self_contained(evaluated_report):
    assert not re.search(r'(src|href)="(https?:|file:|//)', evaluated_report)


def test_write_report_lists_tables(evaluated_report):
    sections = _sections(evaluated_report)

    assert "aaaa1111" in sections["leaderboard"]
    assert "Failed trials" in sections["leaderboard"]
    assert "TrialDivergedError" in sections["leaderboard"]
    assert "sensitivity interval" in sections["test-evaluation"]
    assert "few_cases" in sections["test-evaluation"]
    assert "no diagnosis" in sections["data"]
    assert "expected calibration error" in sections["calibration"]


def test_write_report_default_path(fresh_run):
    path = write_report(fresh_run)

    assert path == fresh_run / "report.html"
    test_section = _sections(path.read_text(encoding="utf-8"))["test-evaluation"]
    assert "Not evaluated on the test split" in test_section


def test_write_report_rejects_other_suffix(synthetic_run, tmp_path):
    with pytest.raises(ValueError, match=r"report.pdf: the name must end in \.html"):
        write_report(synthetic_run, output=tmp_path / "report.pdf")


def test_write_report_rejects_invalid_top(synthetic_run):
    with pytest.raises(ValueError, match="Invalid top 0"):
        write_report(synthetic_run, top=0)


def test_expected_calibration_error_known_cases():
    labels = np.array([1] * 7 + [0] * 3)

    assert expected_calibration_error(labels, np.full(10, 0.75)) == pytest.approx(0.05)
    assert expected_calibration_error(np.array([1, 0]), np.array([0.95, 0.05])) == pytest.approx(0.05)
    # Two bins: scores 0.1 with no positive (gap 0.1) and 0.9 with all positive (gap 0.1), weights 1/2 each.
    assert expected_calibration_error(np.array([0, 0, 1, 1]), np.array([0.1, 0.1, 0.9, 0.9])) == pytest.approx(0.1)
    assert expected_calibration_error(np.array([1]), np.array([1.0])) == pytest.approx(0.0)
