//! Helpers for the list shapes that recur in the schema: a struct list filled
//! from a slice, read back into a `Vec`, and lists of text or data.

use capnp::traits::OwnedStruct;

use crate::ProtoError;

/// Fills `list` (initialised to `items.len()` elements) with `write`, in order.
pub(super) fn write_list<T: OwnedStruct, I>(
    mut list: capnp::struct_list::Builder<'_, T>,
    items: &[I],
    mut write: impl FnMut(&I, T::Builder<'_>),
) {
    for (i, item) in items.iter().enumerate() {
        write(item, list.reborrow().get(i as u32));
    }
}

/// Reads every element of `list` with `read`; the first error ends it.
pub(super) fn read_list<'a, T: OwnedStruct, O>(
    list: capnp::struct_list::Reader<'a, T>,
    read: impl FnMut(T::Reader<'a>) -> Result<O, ProtoError>,
) -> Result<Vec<O>, ProtoError> {
    list.iter().map(read).collect()
}

/// Fills a text list (initialised to `items.len()` elements).
pub(super) fn write_texts(mut list: capnp::text_list::Builder<'_>, items: &[String]) {
    for (i, s) in items.iter().enumerate() {
        list.set(i as u32, s.as_str());
    }
}

/// Fills a data list (initialised to `items.len()` elements).
pub(super) fn write_data(mut list: capnp::data_list::Builder<'_>, items: &[Vec<u8>]) {
    for (i, d) in items.iter().enumerate() {
        list.set(i as u32, d);
    }
}

/// An owned copy of a text field; invalid UTF-8 is an error.
pub(super) fn text(r: capnp::Result<capnp::text::Reader<'_>>) -> Result<String, ProtoError> {
    Ok(r?.to_str()?.to_owned())
}

/// Owned copies of every text of a list.
pub(super) fn texts(r: capnp::text_list::Reader<'_>) -> Result<Vec<String>, ProtoError> {
    r.iter().map(text).collect()
}

/// Owned copies of every element of a data list.
pub(super) fn data_list(r: capnp::data_list::Reader<'_>) -> Result<Vec<Vec<u8>>, ProtoError> {
    r.iter().map(|d| Ok(d?.to_vec())).collect()
}
