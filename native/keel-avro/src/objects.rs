//! Instances made as `object.__new__` and `object.__setattr__` make them: for the classes
//! whose own `__new__`/`__setattr__` the codec and the builder bypass (`uuid.UUID` forbids
//! `__setattr__`; frozen pydantic models refuse every write).

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::intern;
use pyo3::types::{PyString, PyType};

/// A new instance of `class` with `attributes` set, as `object.__new__(class)` then
/// `object.__setattr__` for each would make it. Only for classes that define no `__new__`.
pub(crate) fn instance<'py>(class: &Bound<'py, PyType>, attributes: &[(&Bound<'py, PyString>, &Bound<'py, PyAny>)])
                            -> PyResult<Bound<'py, PyAny>> {
    let py = class.py();
    // SAFETY: the GIL is held; `tp_alloc` is how `object.__new__(class)` allocates (the class
    // is not abstract and defines no `__new__`), and it returns a new reference or NULL with
    // an exception set, which `from_owned_ptr_or_err` turns into `Err`.
    let object = unsafe {
        let tp = class.as_type_ptr();
        let alloc = (*tp).tp_alloc.unwrap_or(ffi::PyType_GenericAlloc);
        Bound::from_owned_ptr_or_err(py, alloc(tp, 0))?
    };
    for (name, value) in attributes {
        // SAFETY: live objects for the call; -1 with an exception set on failure.
        if unsafe { ffi::PyObject_GenericSetAttr(object.as_ptr(), name.as_ptr(), value.as_ptr()) } < 0 {
            return Err(PyErr::fetch(py));
        }
    }
    Ok(object)
}

/// The `uuid.UUID` (`class`) of the integer `n`, as `uuid.UUID(int=n)` makes it (`is_safe`:
/// `uuid.SafeUUID.unknown`), without the checks of its `__init__`.
pub(crate) fn uuid<'py>(class: &Bound<'py, PyType>, is_safe: &Bound<'py, PyAny>, n: u128) -> PyResult<Bound<'py, PyAny>> {
    let py = class.py();
    instance(class, &[(intern!(py, "int"), n.into_pyobject(py)?.as_any()), (intern!(py, "is_safe"), is_safe)])
}
