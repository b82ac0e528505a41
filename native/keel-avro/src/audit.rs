//! The fields part of an audit record (`keel.trust.record`, format `KAR1`), written here because
//! the chainer writes one per event and Python spent a loop turn, a `struct.pack` and an
//! encode per field on it. `keel/trust/record.py` holds the reference implementation and the
//! format's description; the tests hold the two to the same bytes.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyInt, PyString, PyTuple};

/// `prefix` (the magic, the seq, the previous hash), then each value of `fields`: `0x00` for
/// `None`, else `0x01`, its length (u32, big-endian) and its bytes (a `str`'s UTF-8, an `int`'s
/// decimal digits, `bytes` as they are). `None` when a value is of another type (a subclass of
/// `str` or `int` included, whose `str()` may differ), a string is not valid UTF-8 or a value is
/// longer than a u32 can say: the Python implementation writes (or refuses) those.
#[pyfunction]
pub(crate) fn audit_head<'py>(py: Python<'py>, prefix: &[u8], fields: &Bound<'py, PyTuple>)
                              -> Option<Bound<'py, PyBytes>> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(prefix);
    for value in fields.iter() {
        if value.is_none() {
            out.push(0);
        } else if let Ok(text) = value.cast_exact::<PyString>() {
            put(&mut out, text.to_str().ok()?.as_bytes())?;
        } else if let Ok(bytes) = value.cast_exact::<PyBytes>() {
            put(&mut out, bytes.as_bytes())?;
        } else if value.is_exact_instance_of::<PyInt>() {
            put(&mut out, value.extract::<i128>().ok()?.to_string().as_bytes())?;
        } else {
            return None;
        }
    }
    Some(PyBytes::new(py, &out))
}

/// A present field: `0x01`, its length (u32, big-endian), its bytes; `None` when too long.
fn put(out: &mut Vec<u8>, data: &[u8]) -> Option<()> {
    out.push(1);
    out.extend_from_slice(&u32::try_from(data.len()).ok()?.to_be_bytes());
    out.extend_from_slice(data);
    Some(())
}
