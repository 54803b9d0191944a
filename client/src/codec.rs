//! Custom codecs, as Python's `register_codec`: a Rust type travels as a map tagged
//! `_rtype: <name>`, which a Python (or JS) peer that registered a codec of the same name turns
//! into its own class, and back.

use std::fmt;
use std::ops::{Deref, DerefMut};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::values::{from_value, to_value};
use crate::{Map, Value};

/// A type with a codec name (Python's `register_codec({"name": ...})`). Its serde form must be a
/// map (a struct with named fields, or a map); the `_rtype` tag is added and checked by
/// [`Coded`].
///
/// ```
/// use hypha_rpc::codec::{Codec, Coded};
/// #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq, Clone)]
/// struct Point { x: f64, y: f64 }
/// impl Codec for Point { const NAME: &'static str = "Point"; }
///
/// let v = hypha_rpc::to_value(&Coded(Point { x: 1.0, y: 2.0 })).unwrap();
/// let m = v.as_map().unwrap();
/// assert_eq!(m.get("_rtype").and_then(|t| t.as_str()), Some("Point"));  // last, as Python writes it
/// let back: Coded<Point> = hypha_rpc::from_value(&v).unwrap();
/// assert_eq!(back.0, Point { x: 1.0, y: 2.0 });
/// ```
pub trait Codec: Serialize + DeserializeOwned {
    /// The `_rtype` name, the same as the peer's codec name.
    const NAME: &'static str;
}

/// A [`Codec`] value on the wire: `T`'s fields plus `_rtype: T::NAME` (appended last, as
/// Python's encoder does). Use it for arguments, results and fields.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Coded<T>(pub T);

impl<T> Deref for Coded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for Coded<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: fmt::Debug> fmt::Debug for Coded<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T: Codec> Serialize for Coded<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = match to_value(&self.0).map_err(serde::ser::Error::custom)? {
            Value::Map(m) => m,
            other => {
                return Err(serde::ser::Error::custom(format!(
                    "codec {} must serialize to a map, not a {}",
                    T::NAME,
                    other.kind()
                )));
            }
        };
        if !m.contains_key("_rtype") {
            m.push("_rtype", T::NAME);
        }
        m.serialize(s)
    }
}

impl<'de, T: Codec> Deserialize<'de> for Coded<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut m = Map::deserialize(d)?;
        match m.remove("_rtype") {
            Some(Value::Str(t)) if t.as_str() == T::NAME => {}
            other => {
                return Err(serde::de::Error::custom(format!(
                    "expected an object with _rtype {:?}, found {:?}",
                    T::NAME,
                    other.as_ref().and_then(Value::as_str)
                )));
            }
        }
        from_value(&Value::Map(m)).map(Coded).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct P {
        x: i32,
    }
    impl Codec for P {
        const NAME: &'static str = "P";
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Bare(i32);
    impl Codec for Bare {
        const NAME: &'static str = "Bare";
    }

    #[test]
    fn tag_is_added_last_and_checked() {
        let v = to_value(&Coded(P { x: 3 })).unwrap();
        let keys: Vec<_> = v.as_map().unwrap().keys().filter_map(Value::as_str).collect();
        assert_eq!(keys, ["x", "_rtype"]);
        let mut wrong = v.as_map().unwrap().clone();
        wrong.insert("_rtype", "Q");
        let e = from_value::<Coded<P>>(&Value::Map(wrong)).unwrap_err();
        assert!(e.to_string().contains("_rtype \"P\""), "{e}");
        let e = to_value(&Coded(Bare(1))).unwrap_err();
        assert!(e.to_string().contains("must serialize to a map"), "{e}");
    }
}
