"""Loading DICOM into ImageInput, and every bad-input case naming the file and the attribute."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from inference import compare
from inference.errors import InputError
from inference.phantoms import make_chest_pair, make_ct_pair
from inference.pixels import load_folder, load_image, load_path


@pytest.fixture()
def pair():
    return make_chest_pair(3, "new_nodule", 128)


def _save(ds, path):
    ds.save_as(path, enforce_file_format=True)
    return path


def test_load_image_reads_pixels_spacing_and_attributes(tmp_path, pair):
    path = _save(pair.current, tmp_path / "cur.dcm")
    img = load_image(path)
    assert img.pixels.dtype == np.float32 and img.pixels.shape == (128, 128)
    assert img.spacing_mm == pytest.approx((430 / 128, 430 / 128))
    assert (img.modality, img.body_part, img.view) == ("DX", "CHEST", "PA")
    assert img.patient_orientation == ("L", "F")
    assert img.acquired_on is not None and img.source == str(path)
    assert np.array_equal(img.pixels, pair.current.pixel_array.astype(np.float32))


def test_monochrome1_is_inverted_to_the_same_values(tmp_path):
    m2 = make_chest_pair(5, "stable", 128)
    m1 = make_chest_pair(5, "stable", 128, monochrome1=True)
    a = load_image(_save(m2.current, tmp_path / "m2.dcm")).pixels
    b = load_image(_save(m1.current, tmp_path / "m1.dcm")).pixels
    assert m1.current.PhotometricInterpretation == "MONOCHROME1"
    assert np.array_equal(a, b)


def test_rescale_slope_intercept_applied(tmp_path, pair):
    ds = pair.current
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    img = load_image(_save(ds, tmp_path / "r.dcm"))
    assert np.array_equal(img.pixels, ds.pixel_array.astype(np.float32) * 2 - 100)


def test_folder_picks_the_image_and_skips_non_dicom(tmp_path, pair):
    _save(pair.current, tmp_path / "a.dcm")
    (tmp_path / "README.txt").write_text("not dicom")
    img = load_path(tmp_path)
    assert img.sop_instance_uid == pair.current.SOPInstanceUID


def test_folder_with_ct_series_loads_a_sorted_volume(tmp_path):
    ct = make_ct_pair(1, "new_nodule", shape=(12, 64, 64))
    for k, ds in enumerate(reversed(ct.current)):  # written out of order on purpose
        _save(ds, tmp_path / f"s{k:02d}.dcm")
    vol = load_folder(tmp_path)
    assert vol.pixels.shape == (12, 64, 64)
    assert vol.spacing_mm == pytest.approx((3.0, 2.0, 2.0))
    z = [float(d.ImagePositionPatient[2]) for d in ct.current]
    first = ct.current[int(np.argmin(z))]
    assert np.array_equal(vol.pixels[0], first.pixel_array.astype(np.float32) - 1024)


def _expect(path, attribute, fn):
    with pytest.raises(InputError) as err:
        fn()
    msg = str(err.value)
    assert str(path) in msg and attribute in msg, msg
    assert err.value.attribute == attribute


def test_missing_pixel_data(tmp_path, pair):
    del pair.current.PixelData
    p = _save(pair.current, tmp_path / "nopix.dcm")
    _expect(p, "PixelData", lambda: load_image(p))


def test_unsupported_photometric_interpretation(tmp_path, pair):
    pair.current.PhotometricInterpretation = "PALETTE COLOR"
    p = _save(pair.current, tmp_path / "palette.dcm")
    _expect(p, "PhotometricInterpretation", lambda: load_image(p))


def test_pixel_data_shorter_than_rows_x_columns(tmp_path, pair):
    pair.current.Rows = 256  # header claims more pixels than the data holds
    p = _save(pair.current, tmp_path / "short.dcm")
    _expect(p, "PixelData", lambda: load_image(p))


def test_zero_pixel_spacing_means_unknown_but_a_negative_or_half_zero_one_is_an_error(tmp_path, pair):
    pair.current.PixelSpacing = [0, 0]  # how some vendors write "not calibrated"
    del pair.current.ImagerPixelSpacing
    img = load_image(_save(pair.current, tmp_path / "zero.dcm"))
    assert not img.spacing_known and img.spacing_mm == (1.0, 1.0)
    from inference.sanity import check_pair

    flags = check_pair(img, load_image(_save(pair.prior, tmp_path / "prior.dcm")))
    assert [(f.code, f.blocking) for f in flags if f.code == "spacing_unknown"] == [("spacing_unknown", False)]
    for bad in ([0, 0.2], [-0.2, -0.2]):
        pair.current.PixelSpacing = bad
        p = _save(pair.current, tmp_path / "bad.dcm")
        _expect(p, "PixelSpacing", lambda: load_image(p))


def test_lossy_compression_is_read_from_the_header(tmp_path, pair):
    from inference.phantoms import _lossy

    assert load_image(_save(pair.prior, tmp_path / "plain.dcm")).lossy_ratio is None
    _lossy(pair.prior, 40)
    assert load_image(_save(pair.prior, tmp_path / "j2k.dcm")).lossy_ratio == 40.0


def test_nan_float_pixels(tmp_path, pair):
    ds = pair.current
    arr = ds.pixel_array.astype(np.float32)
    arr[10, 10] = np.nan
    del ds.PixelData
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    for k in ("PixelRepresentation", "RescaleSlope", "RescaleIntercept", "RescaleType"):
        delattr(ds, k)
    ds.FloatPixelData = arr.tobytes()
    p = _save(ds, tmp_path / "nan.dcm")
    _expect(p, "FloatPixelData", lambda: load_image(p))


def test_nan_in_array_handed_to_compare(pair):
    from inference.pixels import image_from_dataset

    cur = image_from_dataset(pair.current, "cur.dcm")
    bad = cur.pixels.copy()
    bad[5, 5] = np.nan
    prior = dataclasses.replace(cur, pixels=bad, source="prior.dcm")
    _expect("prior.dcm", "PixelData", lambda: compare(cur, [prior]))


def test_one_pixel_image(tmp_path, pair):
    ds = pair.current
    ds.Rows = ds.Columns = 1
    ds.PixelData = b"\x00\x00"
    p = _save(ds, tmp_path / "one.dcm")
    _expect(p, "Rows/Columns", lambda: load_image(p))


def test_huge_image_refused_before_allocating(tmp_path, pair):
    ds = pair.current
    ds.Rows = ds.Columns = 20000
    ds.PixelData = b"\x00\x00" * 16  # the header alone must be enough to refuse
    p = _save(ds, tmp_path / "huge.dcm")
    t0 = time.perf_counter()
    _expect(p, "Rows/Columns", lambda: load_image(p))
    assert time.perf_counter() - t0 < 2.0


def test_not_dicom_and_missing_file(tmp_path):
    p = tmp_path / "x.dcm"
    p.write_bytes(b"hello")
    _expect(p, "file", lambda: load_image(p))
    q = tmp_path / "absent.dcm"
    _expect(q, "file", lambda: load_image(q))
