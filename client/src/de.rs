//! A serde `Deserializer` straight over a [`Value`], so typed results and arguments are read
//! without re-encoding them to msgpack first (one copy and one parse less per value). It reads
//! exactly what rmp-serde would read from the value's bytes: enums externally tagged (a string
//! for a unit variant, a one-entry map otherwise), structs from maps or arrays, ext values as
//! `_ExtStruct((tag, bytes))`.

use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, MapAccess, SeqAccess, VariantAccess,
    Visitor,
};

use crate::Value;

/// Why a value did not fit the requested type.
#[derive(Debug)]
pub(crate) struct DeError(pub String);

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError(msg.to_string())
    }
}

/// Deserializes from a borrowed [`Value`].
pub(crate) struct ValueDeserializer<'a>(pub &'a Value);

impl<'de> Deserializer<'de> for ValueDeserializer<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Nil => v.visit_unit(),
            Value::Bool(b) => v.visit_bool(*b),
            Value::Integer(i) => match i.as_u64() {
                Some(u) => v.visit_u64(u),
                None => v.visit_i64(i.as_i64().unwrap_or_default()),
            },
            Value::F32(f) => v.visit_f32(*f),
            Value::F64(f) => v.visit_f64(*f),
            Value::Str(s) => v.visit_borrowed_str(s.as_str()),
            Value::Bin(b) => v.visit_borrowed_bytes(b),
            Value::Array(a) => v.visit_seq(Seq(a.iter())),
            Value::Map(m) => v.visit_map(Entries { it: m.iter(), value: None }),
            Value::Ext(tag, data) => v.visit_newtype_struct(ExtDeserializer(*tag, data)),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Nil => v.visit_none(),
            _ => v.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Ext(..) => self.deserialize_any(v),
            _ => v.visit_newtype_struct(self),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Str(_) | Value::Integer(_) => v.visit_enum(Enum { variant: self.0, content: None }),
            Value::Map(m) if m.len() == 1 => {
                let (k, x) = &m.as_slice()[0];
                v.visit_enum(Enum { variant: k, content: Some(x) })
            }
            Value::Array(a) if a.len() == 2 => v.visit_enum(Enum { variant: &a[0], content: Some(&a[1]) }),
            other => Err(de::Error::custom(format!("expected an enum, found a {}", other.kind()))),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

struct Seq<'a>(std::slice::Iter<'a, Value>);

impl<'de> SeqAccess<'de> for Seq<'de> {
    type Error = DeError;
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, DeError> {
        self.0.next().map(|x| seed.deserialize(ValueDeserializer(x))).transpose()
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

struct Entries<'a> {
    it: std::slice::Iter<'a, (Value, Value)>,
    value: Option<&'a Value>,
}

impl<'de> MapAccess<'de> for Entries<'de> {
    type Error = DeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, DeError> {
        match self.it.next() {
            Some((k, v)) => {
                self.value = Some(v);
                seed.deserialize(ValueDeserializer(k)).map(Some)
            }
            None => Ok(None),
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let v = self.value.take().ok_or_else(|| DeError("a map value without its key".into()))?;
        seed.deserialize(ValueDeserializer(v))
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.it.len())
    }
}

/// An ext value as rmp-serde hands it over: the tuple `(tag, bytes)`.
struct ExtDeserializer<'a>(i8, &'a [u8]);

impl<'de> Deserializer<'de> for ExtDeserializer<'de> {
    type Error = DeError;
    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        v.visit_seq(ExtSeq { tag: Some(self.0), data: Some(self.1) })
    }
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

struct ExtSeq<'a> {
    tag: Option<i8>,
    data: Option<&'a [u8]>,
}

impl<'de> SeqAccess<'de> for ExtSeq<'de> {
    type Error = DeError;
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, DeError> {
        if let Some(tag) = self.tag.take() {
            return seed.deserialize(tag.into_deserializer()).map(Some);
        }
        match self.data.take() {
            Some(d) => seed.deserialize(serde::de::value::BorrowedBytesDeserializer::new(d)).map(Some),
            None => Ok(None),
        }
    }
}

struct Enum<'a> {
    variant: &'a Value,
    content: Option<&'a Value>,
}

impl<'de> EnumAccess<'de> for Enum<'de> {
    type Error = DeError;
    type Variant = Variant<'de>;
    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Variant<'de>), DeError> {
        let v = seed.deserialize(ValueDeserializer(self.variant))?;
        Ok((v, Variant(self.content)))
    }
}

struct Variant<'a>(Option<&'a Value>);

impl<'de> VariantAccess<'de> for Variant<'de> {
    type Error = DeError;
    fn unit_variant(self) -> Result<(), DeError> {
        match self.0 {
            None | Some(Value::Nil) => Ok(()),
            Some(Value::Array(a)) if a.is_empty() => Ok(()),
            Some(other) => {
                Err(de::Error::custom(format!("expected a unit variant, found a {}", other.kind())))
            }
        }
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        let v = self.0.ok_or_else(|| DeError("expected a newtype variant's value".into()))?;
        seed.deserialize(ValueDeserializer(v))
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, DeError> {
        let x = self.0.ok_or_else(|| DeError("expected a tuple variant's values".into()))?;
        ValueDeserializer(x).deserialize_any(v)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        let x = self.0.ok_or_else(|| DeError("expected a struct variant's fields".into()))?;
        ValueDeserializer(x).deserialize_any(v)
    }
}

#[cfg(test)]
mod tests {
    use serde::de::DeserializeOwned;
    use serde::{Deserialize, Serialize};

    use crate::values::to_value;
    use crate::{Map, Value};

    /// Reading through the value must give what rmp-serde gives from the value's bytes.
    fn same<T: DeserializeOwned + PartialEq + std::fmt::Debug>(v: &Value) {
        let direct = T::deserialize(super::ValueDeserializer(v)).map_err(|e| e.to_string());
        let bytes = hypha_rpc_core::codec::to_vec(v);
        let via_rmp = rmp_serde::from_slice::<T>(&bytes).map_err(|e| e.to_string());
        assert_eq!(direct.is_ok(), via_rmp.is_ok(), "{v:?}: {direct:?} vs {via_rmp:?}");
        if let (Ok(a), Ok(b)) = (direct, via_rmp) {
            assert_eq!(a, b, "{v:?}");
        }
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum Shape {
        Dot,
        Circle(f64),
        Rect { w: u32, h: u32 },
        Pair(i8, String),
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Rec {
        name: String,
        age: Option<u8>,
        tags: Vec<String>,
        raw: serde_bytes::ByteBuf,
        shape: Shape,
        nested: Option<Box<Rec>>,
        any: Value,
    }

    #[test]
    fn reads_what_rmp_serde_reads() {
        for shape in [Shape::Dot, Shape::Circle(1.5), Shape::Rect { w: 2, h: 3 }, Shape::Pair(-1, "x".into())]
        {
            let rec = Rec {
                name: "ada".into(),
                age: Some(36),
                tags: vec!["a".into(), "é".into()],
                raw: serde_bytes::ByteBuf::from(vec![0, 255]),
                shape,
                nested: Some(Box::new(Rec {
                    name: "inner".into(),
                    age: None,
                    tags: vec![],
                    raw: serde_bytes::ByteBuf::new(),
                    shape: Shape::Dot,
                    nested: None,
                    any: Value::Nil,
                })),
                any: Value::Array(vec![Value::F32(0.5), Value::Ext(5, vec![1, 2].into()), (-3i64).into()]),
            };
            let v = to_value(&rec).unwrap();
            same::<Rec>(&v);
            assert_eq!(super::super::values::from_value::<Rec>(&v).unwrap(), rec);
        }
        let mut odd = Map::new();
        odd.insert(1, "int key");
        for v in [
            Value::Nil,
            Value::from(300),
            Value::from(-5),
            Value::from(u64::MAX),
            Value::F64(2.5),
            Value::from("s"),
            Value::Map(odd),
        ] {
            same::<Value>(&v);
            same::<Option<u8>>(&v);
            same::<i64>(&v);
            same::<f64>(&v);
            same::<String>(&v);
            same::<std::collections::BTreeMap<String, String>>(&v);
        }
        same::<(u8, String)>(&Value::Array(vec![1.into(), "x".into()]));
        same::<Vec<u16>>(&Value::Array(vec![1.into(), 70_000.into()]));
    }
}
