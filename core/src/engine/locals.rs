//! Local functions, generators and `_rintf` interfaces that we send: the placeholders in
//! outgoing values, the sessions that keep them callable, and when they are freed.

use super::*;

pub(super) fn parse_local_generator(v: &Value) -> Option<GenId> {
    match v {
        Value::Ext(LOCAL_GENERATOR_EXT, p) if p.len() == 8 => {
            Some(GenId(u64::from_be_bytes(p[..8].try_into().ok()?)))
        }
        _ => None,
    }
}

pub(super) fn parse_local_function(v: &Value) -> Option<(FnId, String)> {
    match v {
        Value::Ext(LOCAL_FUNCTION_EXT, p) if p.len() >= 8 => {
            let id = u64::from_be_bytes(p[..8].try_into().ok()?);
            let name = core::str::from_utf8(&p[8..]).ok()?;
            Some((FnId(id), name.into()))
        }
        _ => None,
    }
}

/// Local functions and generators we returned in a reply, kept in a session of ours that
/// only the peer we answered may call (PROTOCOL.md §5.4, §8).
#[derive(Debug)]
pub(super) struct Export {
    pub(super) peer: String,
    pub(super) functions: Vec<(String, FnId)>,
    pub(super) generators: Vec<(String, GenId)>,
    pub(super) last_used: Instant,
}

/// What `replace_locals` found in a value.
#[derive(Debug, Default)]
pub(super) struct Locals {
    /// The peer the value goes to: the only one allowed to call `_rintf` interfaces in it.
    pub(super) peer: String,
    pub(super) functions: Vec<(String, FnId)>,
    pub(super) generators: Vec<(String, GenId)>,
    /// Interfaces created for this value (dropped again if it cannot be sent).
    pub(super) interfaces: Vec<String>,
    /// Set when an interface could not be created (limit reached).
    pub(super) error: Option<EngineError>,
}

/// A `_rintf` object we sent: a local-only service `_rintf_<id>` that only `peer` may call,
/// until it calls `_dispose`, leaves, or we reconnect (PROTOCOL.md §9).
#[derive(Debug)]
pub(super) struct Interface {
    pub(super) peer: String,
    pub(super) functions: Vec<(String, FnId)>,
}

pub(super) fn contains_local_function(v: &Value) -> bool {
    match v {
        Value::Ext(LOCAL_FUNCTION_EXT | LOCAL_GENERATOR_EXT, _) => true,
        Value::Array(a) => a.iter().any(contains_local_function),
        Value::Map(m) => m.iter().any(|(k, x)| contains_local_function(k) || contains_local_function(x)),
        _ => false,
    }
}

impl Engine {
    /// Replaces [`local_function`] and [`local_generator`] placeholders in `v` with
    /// descriptors living in session `session`, collecting them in `out`. `qualified`: write
    /// `_rtarget` as `ws/client` (Python does in replies) or bare (in call arguments).
    pub(super) fn replace_locals(&mut self, v: &mut Value, session: &str, qualified: bool, out: &mut Locals) {
        let me = self.me.to_string();
        let target = if qualified { me.clone() } else { split_client(&me).1.to_string() };
        let server = self.info.as_ref().map(|i| i.public_base_url.clone()).unwrap_or_default();
        // With encryption on, what we send carries our key so the holder calls it encrypted.
        let enc_pub = self.public_key().map(|k| Bytes::copy_from_slice(&k));
        if let Some((fid, name)) = parse_local_function(v) {
            let key =
                if name.is_empty() { self.rng.short_id() } else { format!("{}#{name}", self.rng.short_id()) };
            *v = Method {
                target,
                method: format!("{session}.{key}"),
                promise: Some(PromiseMode::Compact),
                server: Some(server),
                name: Some(if name.is_empty() { "callback".into() } else { name }),
                doc: Some(Value::Nil),
                layout: MethodLayout::Callback,
                enc_pub,
                ..Method::default()
            }
            .to_value();
            out.functions.push((key, fid));
            return;
        }
        if let Some(gid) = parse_local_generator(v) {
            let max = self.config.limits.max_generators;
            if self.open_generators() + out.generators.len() >= max {
                out.error = Some(EngineError::LimitReached { what: "open generators", max });
                return;
            }
            let key = self.rng.short_id();
            let mut other = Map::new();
            if let Some(k) = enc_pub {
                // Not in Python's layout (it sends generator items in clear); between our own
                // peers the pulls, and so the items, travel encrypted. Python ignores the key.
                other.insert("_renc_pub", Value::Bin(k));
            }
            *v = Generator {
                server: Some(server),
                target: me,
                method: format!("{session}.{key}"),
                close_method: Some(format!("{session}.{key}:close")),
                promise: Some(PromiseMode::Compact),
                doc: Some("Remote generator".into()),
                other,
            }
            .to_value();
            out.generators.push((key, gid));
            return;
        }
        if let Value::Map(m) = v {
            if m.get("_rintf") == Some(&Value::Bool(true))
                && m.values().any(|x| parse_local_function(x).is_some())
            {
                self.make_interface(m, session, qualified, out);
                return;
            }
        }
        match v {
            Value::Array(a) => a.iter_mut().for_each(|x| self.replace_locals(x, session, qualified, out)),
            Value::Map(m) => m.iter_mut().for_each(|(_, x)| self.replace_locals(x, session, qualified, out)),
            _ => {}
        }
    }

    /// Turns a `_rintf: true` map into a local-only `_rintf_<id>` service callable only by
    /// `out.peer`, written as Python writes it: functions as service descriptors, then
    /// `_dispose` and `_rintf_service_id`.
    pub(super) fn make_interface(&mut self, m: &mut Map, session: &str, qualified: bool, out: &mut Locals) {
        let max = self.config.limits.max_interfaces;
        if self.interfaces.len() >= max {
            out.error = Some(EngineError::LimitReached { what: "_rintf interfaces", max });
            return;
        }
        let sid = format!("_rintf_{}", self.rng.short_id());
        let server = self.info.as_ref().map(|i| i.public_base_url.clone()).unwrap_or_default();
        let me = self.me.to_string();
        let enc_pub = self.public_key().map(|k| Bytes::copy_from_slice(&k));
        let descriptor = |name: &str, key: &str, is_async: bool| {
            Method {
                target: me.clone(),
                method: format!("services.{sid}.{key}"),
                promise: Some(PromiseMode::Compact),
                server: Some(server.clone()),
                name: Some(name.into()),
                is_async: Some(is_async),
                doc: Some(Value::Nil),
                enc_pub: enc_pub.clone(),
                ..Method::default()
            }
            .to_value()
        };
        let mut functions = Vec::new();
        let mut encoded = Map::with_capacity(m.len() + 2);
        for (k, x) in core::mem::take(m) {
            let key = k.as_str().map(String::from);
            match (key, parse_local_function(&x)) {
                (Some(key), Some((fid, name))) if !key.starts_with('_') => {
                    let name = if name.is_empty() { key.clone() } else { name };
                    encoded.push(k, descriptor(&name, &key, false));
                    functions.push((key, fid));
                }
                _ => {
                    let mut x = x;
                    self.replace_locals(&mut x, session, qualified, out);
                    encoded.push(k, x);
                }
            }
        }
        encoded.insert("_dispose", descriptor("_dispose", "_dispose", true));
        encoded.insert("_rintf_service_id", sid.as_str());
        *m = encoded;
        out.interfaces.push(sid.clone());
        self.interfaces.insert(sid, Interface { peer: out.peer.clone(), functions });
    }

    /// Drops interfaces (all, or those of `peer`), telling the driver which functions died.
    pub(super) fn drop_interfaces(&mut self, peer: Option<&str>) {
        let dead: Vec<String> = self
            .interfaces
            .iter()
            .filter(|(_, i)| peer.is_none_or(|p| i.peer == p))
            .map(|(s, _)| s.clone())
            .collect();
        for s in dead {
            if let Some(i) = self.interfaces.remove(&s) {
                let functions = i.functions.into_iter().map(|(_, f)| f).collect();
                self.events.push_back(Event::InterfaceDisposed { service: s, functions });
            }
        }
    }

    /// Frees a generator that reached its end (in an export or a call's session).
    pub(super) fn forget_generator(&mut self, s: &str, key: &str) {
        if let Some(x) = self.exports.get_mut(s) {
            x.generators.retain(|(k, _)| k != key);
            let s = s.to_string();
            self.drop_export_if_empty(&s);
        } else if let Some(p) = self.sessions.get_mut(s) {
            p.generators.retain(|(k, _)| k != key);
        }
    }

    pub(super) fn drop_export_if_empty(&mut self, s: &str) {
        if self.exports.get(s).is_some_and(|x| x.functions.is_empty() && x.generators.is_empty()) {
            self.exports.remove(s);
        }
    }

    /// Drops exports: of `peer` (it left), or idle past the expiry when `peer` is `None`.
    pub(super) fn drop_exports(&mut self, now: Instant, peer: Option<&str>) {
        let expiry = self.config.limits.export_idle_expiry;
        let dead: Vec<String> = self
            .exports
            .iter()
            .filter(|(_, x)| match peer {
                Some(p) => x.peer == p,
                None => now >= x.last_used + expiry,
            })
            .map(|(s, _)| s.clone())
            .collect();
        for s in dead {
            self.release_export(&s);
        }
    }

    /// Drops one export, telling the driver which of its functions and generators died.
    pub(super) fn release_export(&mut self, s: &str) {
        if let Some(x) = self.exports.remove(s) {
            for (_, generator) in x.generators {
                self.events.push_back(Event::GeneratorClosed { generator });
            }
            if !x.functions.is_empty() {
                let functions = x.functions.into_iter().map(|(_, f)| f).collect();
                self.events.push_back(Event::FunctionsReleased { functions });
            }
        }
    }
}
