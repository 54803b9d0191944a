//! Incoming calls: where replies go, which local code a method path names, whether the
//! caller may call it, and the `built-in` service (including `message_cache` uploads to us).

use super::*;

/// Where the replies of an incoming call go (PROTOCOL.md §5.2).
#[derive(Debug, Default)]
pub(super) enum Route {
    /// Fire and forget: no reply.
    #[default]
    None,
    /// `promise: "*"`: `<session>.resolve|reject|heartbeat` at the caller, built when used.
    Compact,
    /// A full promise object: the resolve, reject and heartbeat slots as sent (targets
    /// qualified).
    Full(Box<[Option<Method>; 3]>),
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    Resolve,
    Reject,
    Heartbeat,
}

#[derive(Debug)]
pub(super) struct Active {
    pub(super) caller: String,
    pub(super) session: Option<String>,
    pub(super) route: Route,
    /// Heartbeat interval, when the caller asked for heartbeats.
    pub(super) interval: Option<Duration>,
    pub(super) beat_at: Option<Instant>,
    pub(super) cancelled: bool,
    /// For a generator's `next`: its session and key, so the end frees it.
    pub(super) generator: Option<(String, String)>,
    /// The caller's public key when the request came encrypted: the reply goes back sealed.
    pub(super) reply_key: Option<[u8; crate::crypto::KEY_LEN]>,
}

/// The (target, method) of a reply slot, or `None` when the caller did not ask for it.
pub(super) fn slot_address(
    route: &Route,
    caller: &str,
    session: Option<&str>,
    slot: Slot,
) -> Option<(String, String)> {
    match route {
        Route::None => None,
        Route::Compact => {
            let name = match slot {
                Slot::Resolve => "resolve",
                Slot::Reject => "reject",
                Slot::Heartbeat => "heartbeat",
            };
            Some((caller.to_string(), format!("{}.{name}", session?)))
        }
        Route::Full(slots) => {
            let [resolve, reject, heartbeat] = &**slots;
            let m = match slot {
                Slot::Resolve => resolve,
                Slot::Reject => reject,
                Slot::Heartbeat => heartbeat,
            };
            m.as_ref().map(|m| (m.target.clone(), m.method.clone()))
        }
    }
}

/// The error of a reject: `{_rtype: "error", _rvalue, _rtrace}`, or whatever else was sent.
/// The server's own answer for a callee that left (PROTOCOL.md §3.3, "Target peer <id> is not
/// connected" with an empty trace) becomes [`CallError::PeerDisconnected`], the same error a
/// call in flight gets when its callee leaves.
pub(super) fn remote_error(v: Option<&Value>) -> CallError {
    match v.and_then(RemoteError::from_value) {
        Some(Ok(e)) => {
            let gone = e.trace.as_deref().unwrap_or("").is_empty();
            let peer =
                e.message.strip_prefix("Target peer ").and_then(|r| r.strip_suffix(" is not connected"));
            match peer {
                Some(peer) if gone && !peer.is_empty() && !peer.contains(' ') => {
                    CallError::PeerDisconnected { peer: peer.into() }
                }
                _ => CallError::Remote { message: e.message, trace: e.trace },
            }
        }
        // Anything else a peer rejected with: its text, or the kind of value it sent (no Debug
        // formatting of untrusted values: unbounded output, and float formatting code on
        // small devices).
        _ => {
            let message = match v {
                Some(Value::Str(s)) => s.as_str().to_string(),
                Some(other) => format!("rejected with a {} value", other.kind()),
                None => String::new(),
            };
            CallError::Remote { message, trace: None }
        }
    }
}

/// Prepares a value a peer sent: bare `_rtarget`s of callables get the sender's workspace
/// (PROTOCOL.md §4.3), and our reserved placeholder ext is refused.
pub(super) fn sanitize_incoming(v: &mut Value, ws: &str) -> Result<(), ()> {
    match v {
        Value::Ext(LOCAL_FUNCTION_EXT | LOCAL_GENERATOR_EXT, _) => Err(()),
        Value::Array(a) => a.iter_mut().try_for_each(|x| sanitize_incoming(x, ws)),
        Value::Map(m) => {
            let callable = matches!(m.get("_rtype").and_then(Value::as_str), Some("method" | "generator"));
            if callable {
                if let Some(Value::Str(t)) = m.get_mut("_rtarget") {
                    if !t.contains('/') {
                        *t = format!("{ws}/{t}").into();
                    }
                }
            }
            m.iter_mut().try_for_each(|(k, x)| {
                sanitize_incoming(k, ws)?;
                sanitize_incoming(x, ws)
            })
        }
        _ => Ok(()),
    }
}

/// Positional arguments and the kwargs map of a call's `extra`.
/// At most the first 256 bytes of `s` (on a char boundary), for error texts that quote what a
/// peer sent: a 1 MiB method path must not come back as a 2 MiB reject.
pub(super) fn clip(s: &str) -> &str {
    let mut end = s.len().min(256);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub(super) fn split_kwargs(extra: &Map) -> (&[Value], Option<&Map>) {
    let args = extra.get("args").and_then(Value::as_array).unwrap_or(&[]);
    if extra.get("with_kwargs").and_then(Value::as_bool) == Some(true) {
        if let Some((last, rest)) = args.split_last() {
            return (rest, last.as_map());
        }
    }
    (args, None)
}

impl Engine {
    pub(super) fn handle_method(
        &mut self,
        now: Instant,
        mut frame: Frame,
        reassembled: bool,
    ) -> Result<(), InputError> {
        // Envelope keys come from `main` only (the server wrote `from`, `ws`, `user`); the
        // payload keys from `extra` only. A forged `from` inside `extra` is never read.
        let main_str = |k: &str| frame.main.get(k).and_then(Value::as_str).map(String::from);
        let from =
            main_str("from").ok_or_else(|| InputError::Protocol("method frame without `from`".into()))?;
        let method =
            main_str("method").ok_or_else(|| InputError::Protocol("method frame without `method`".into()))?;
        let session = main_str("session");
        let parent = main_str("parent");
        let (remote_ws, _) = split_client(&from);
        let remote_ws = remote_ws.to_string();
        let my_ws = self.workspace();
        if let Some(to) = main_str("to") {
            let to_ws = split_client(&to).0;
            // On a peer link nothing is routed: whatever the peer addressed is for us.
            if !to_ws.is_empty() && to_ws != my_ws && self.config.peer.is_none() {
                return Err(InputError::Protocol(format!("workspace mismatch: frame for {to}")));
            }
        }
        let mut extra_map = frame.extra.take().unwrap_or_default();
        // An encrypted payload is opened first; everything below reads the plaintext. One that
        // cannot be opened cannot be answered (its promise is inside): dropped, logged.
        self.incoming_key = None;
        self.incoming_key = self.open_extra(&mut extra_map, &format!("{from}:{}", clip(&method)))?;
        let extra = &extra_map;

        // Where replies go (PROTOCOL.md §5.2).
        let (route, interval) = self.promise_route(extra, &from, session.as_deref())?;

        // Resolve the method path.
        let mut generator_key = None;
        let target = if let Some(rest) = method.strip_prefix("services._rintf_") {
            let (svc, path) = rest.split_once('.').unwrap_or((rest, ""));
            let svc = format!("_rintf_{svc}");
            match self.interfaces.get(&svc) {
                // Only the peer it was sent to: stricter than Python, which lets any client of
                // our workspace call it.
                Some(i) if i.peer != from => {
                    Err(format!("Permission denied for invoking protected method {}", clip(&method)))
                }
                Some(_) if path == "_dispose" => {
                    if let Some(i) = self.interfaces.remove(&svc) {
                        let functions = i.functions.into_iter().map(|(_, f)| f).collect();
                        self.events.push_back(Event::InterfaceDisposed { service: svc, functions });
                    }
                    return self.answer_now(now, &route, &from, session.as_deref(), Ok(Value::Nil));
                }
                Some(i) => match i.functions.iter().find(|(k, _)| k == path) {
                    Some((_, f)) => Ok(Some(InvokeTarget::Interface { service: svc.clone(), function: *f })),
                    None => Err(format!("Method expired or not found: {from}:{}", clip(&method))),
                },
                None => Err(format!("Method expired or not found: {from}:{}", clip(&method))),
            }
        } else if let Some(rest) = method.strip_prefix("services.") {
            let (svc, path) = rest.split_once('.').unwrap_or((rest, ""));
            self.resolve_service_call(&from, &remote_ws, svc, path, &method)
        } else {
            let (s, rest) = method.split_once('.').unwrap_or((method.as_str(), ""));
            if let Some(x) = self.exports.get_mut(s) {
                // A function or generator we returned earlier.
                x.last_used = now;
                if x.peer != from {
                    Err(format!("Access denied for method call ({}) from {from}", clip(&method)))
                } else if let Some(key) = rest.strip_suffix(":close") {
                    let found = x.generators.iter().position(|(k, _)| k == key);
                    let closed = found.map(|i| x.generators.remove(i).1);
                    let s = s.to_string();
                    self.drop_export_if_empty(&s);
                    if let Some(generator) = closed {
                        self.events.push_back(Event::GeneratorClosed { generator });
                    }
                    // Closing twice, or after the end, is harmless (`true`, as Python).
                    return self.answer_now(now, &route, &from, session.as_deref(), Ok(Value::Bool(true)));
                } else if let Some((_, g)) = x.generators.iter().find(|(k, _)| k == rest) {
                    generator_key = Some((s.to_string(), rest.to_string()));
                    Ok(Some(InvokeTarget::GeneratorNext { generator: *g }))
                } else if let Some((_, f)) = x.functions.iter().find(|(k, _)| k == rest) {
                    Ok(Some(InvokeTarget::Returned { function: *f }))
                } else {
                    Err(format!("Method expired or not found: {from}:{}", clip(&method)))
                }
            } else {
                match self.sessions.get(s) {
                    None if matches!(rest, "resolve" | "reject" | "heartbeat") => return Ok(()), // late reply
                    // Closing a generator that already ended or was closed is harmless: `true`.
                    None if rest.ends_with(":close") => {
                        return self.answer_now(
                            now,
                            &route,
                            &from,
                            session.as_deref(),
                            Ok(Value::Bool(true)),
                        );
                    }
                    None => Err(format!("Session not found: {from}:{}", clip(&method))),
                    Some(p) if p.target != from => {
                        Err(format!("Access denied for method call ({}) from {from}", clip(&method)))
                    }
                    Some(p) => match rest {
                        "heartbeat" => {
                            let key = s.to_string();
                            self.touch_session(now, &key, true);
                            return Ok(());
                        }
                        "resolve" | "reject" => {
                            let mut value =
                                extra.get("args").and_then(Value::as_array).and_then(|a| a.first()).cloned();
                            if let Some(v) = &mut value {
                                if sanitize_incoming(v, &remote_ws).is_err() {
                                    let err =
                                        CallError::BadReply("reply carries a reserved ext value".into());
                                    self.settle(now, s.to_string(), Err(err));
                                    return Ok(());
                                }
                            }
                            let result = if rest == "resolve" {
                                Ok(value.unwrap_or_default())
                            } else {
                                Err(remote_error(value.as_ref()))
                            };
                            self.settle(now, s.to_string(), result);
                            return Ok(());
                        }
                        key => {
                            if let Some((_, f)) = p.callbacks.iter().find(|(k, _)| k == key) {
                                Ok(Some(InvokeTarget::Callback { function: *f, call: p.id }))
                            } else if let Some((_, g)) = p.generators.iter().find(|(k, _)| k == key) {
                                generator_key = Some((s.to_string(), key.to_string()));
                                Ok(Some(InvokeTarget::GeneratorNext { generator: *g }))
                            } else if let Some(k) = key.strip_suffix(":close") {
                                let id = p.generators.iter().find(|(g, _)| g == k).map(|(_, id)| *id);
                                if let Some(p) = self.sessions.get_mut(s) {
                                    p.generators.retain(|(g, _)| g != k);
                                }
                                if let Some(generator) = id {
                                    self.events.push_back(Event::GeneratorClosed { generator });
                                }
                                return self.answer_now(
                                    now,
                                    &route,
                                    &from,
                                    session.as_deref(),
                                    Ok(Value::Bool(true)),
                                );
                            } else {
                                Err(format!("Method expired or not found: {from}:{}", clip(&method)))
                            }
                        }
                    },
                }
            }
        };
        // `trusted_keys` (after the visibility checks, as Python): only encrypted calls from
        // listed keys.
        let target = match target {
            Ok(Some(InvokeTarget::Service { service, function })) => {
                let keys =
                    self.services.iter().find(|s| s.id == service).and_then(|s| s.trusted_keys.as_ref());
                match (keys, self.incoming_key) {
                    (Some(_), None) => Err(format!(
                        "Encryption required for method {from}:{} (trusted_keys is set)",
                        clip(&method)
                    )),
                    (Some(keys), Some(k))
                        if !keys.iter().any(|t| crate::crypto::key_from_hex(t) == Some(k)) =>
                    {
                        Err(format!(
                            "Caller's public key is not in the trusted keys list for {from}:{}",
                            clip(&method)
                        ))
                    }
                    _ => Ok(Some(InvokeTarget::Service { service, function })),
                }
            }
            other => other,
        };
        let target = match target {
            Ok(Some(t)) => t,
            Ok(None) => {
                // The built-in service, answered here.
                let path = method.strip_prefix("services.built-in.").unwrap_or_default().to_string();
                if reassembled && path.starts_with("message_cache.") {
                    let err = RemoteError {
                        message: "nested chunked messages are refused".into(),
                        ..RemoteError::default()
                    };
                    return self.answer_now(now, &route, &from, session.as_deref(), Err(err));
                }
                let (result, message) = self.builtin_call(now, &path, extra, &frame);
                self.answer_now(now, &route, &from, session.as_deref(), result)?;
                return match message {
                    Some(m) => self.dispatch(now, m, true),
                    None => Ok(()),
                };
            }
            Err(message) => {
                let err = RemoteError {
                    message: message.clone(),
                    trace: Some(format!("Exception: {message}\n")),
                    other: Map::new(),
                };
                self.answer_now(now, &route, &from, session.as_deref(), Err(err))?;
                return Err(InputError::Protocol(message));
            }
        };

        if self.active.len() >= self.config.limits.max_active_invocations {
            let message =
                format!("Too many concurrent calls (limit {})", self.config.limits.max_active_invocations);
            let err = RemoteError { message, trace: None, other: Map::new() };
            return self.answer_now(now, &route, &from, session.as_deref(), Err(err));
        }

        let with_kwargs = extra.get("with_kwargs").and_then(Value::as_bool).unwrap_or(false);
        let mut args = match extra_map.remove("args") {
            Some(Value::Array(a)) => a,
            _ => Vec::new(),
        };
        for a in &mut args {
            if sanitize_incoming(a, &remote_ws).is_err() {
                let err = RemoteError {
                    message: "reserved ext value in arguments".into(),
                    trace: None,
                    other: Map::new(),
                };
                return self.answer_now(now, &route, &from, session.as_deref(), Err(err));
            }
        }
        let mut kwargs = None;
        let trailing_rkwargs = args
            .last()
            .and_then(Value::as_map)
            .is_some_and(|m| m.get("_rkwargs") == Some(&Value::Bool(true)));
        if with_kwargs || trailing_rkwargs {
            match args.pop() {
                Some(Value::Map(mut m)) => {
                    m.remove("_rkwargs");
                    kwargs = Some(m);
                }
                _ => {
                    let err = RemoteError {
                        message: "with_kwargs set but the last argument is not a map".into(),
                        trace: None,
                        other: Map::new(),
                    };
                    return self.answer_now(now, &route, &from, session.as_deref(), Err(err));
                }
            }
        }
        let context = match &target {
            InvokeTarget::Service { service, function } => {
                let wants = self
                    .services
                    .iter()
                    .find(|s| s.id == *service)
                    .is_some_and(|s| s.wants_context(function));
                wants.then(|| Context {
                    from: from.clone(),
                    to: self.me().to_string(),
                    ws: frame.main.get("ws").and_then(Value::as_str).unwrap_or(&remote_ws).to_string(),
                    user: frame.main.get("user").cloned().unwrap_or_default(),
                    method: method.clone(),
                    session: session.clone(),
                    parent: parent.clone(),
                    connection_type: if self.config.peer.is_some() { "webrtc" } else { "websocket" },
                    caller_public_key: self.incoming_key.map(|k| crate::crypto::to_hex(&k)),
                })
            }
            _ => None,
        };
        self.next_invoke += 1;
        let id = InvokeId(self.next_invoke);
        let wants_reply = !matches!(route, Route::None);
        let beat_at = interval.map(|_| now + self.config.first_heartbeat_after);
        if let Some(t) = beat_at {
            // Due at once (by default), sent only if the driver has not replied by its next
            // timeout check: a handler that answers synchronously costs no heartbeat.
            self.beats.insert((t, id));
        }
        self.active.insert(
            id,
            Active {
                caller: from.clone(),
                session: session.clone(),
                route,
                interval,
                beat_at,
                cancelled: false,
                generator: generator_key,
                reply_key: self.incoming_key,
            },
        );
        self.events.push_back(Event::Invoke(Invocation {
            id,
            target,
            args,
            kwargs,
            context,
            caller: from,
            session,
            wants_reply,
        }));
        Ok(())
    }

    /// `Ok(Some)` for a user service function, `Ok(None)` for `built-in`, `Err` with Python's
    /// message when the path names nothing callable or the caller may not call it.
    pub(super) fn resolve_service_call(
        &self,
        from: &str,
        remote_ws: &str,
        svc: &str,
        path: &str,
        method: &str,
    ) -> Result<Option<InvokeTarget>, String> {
        if svc == "built-in" {
            return match self.builtin_spec().function_at(path) {
                Some(_) => Ok(None),
                None => Err(format!("Method expired or not found: {from}:{}", clip(method))),
            };
        }
        let spec = self.services.iter().find(|s| s.id == svc);
        let Some(spec) = spec.filter(|s| s.function_at(path).is_some()) else {
            return Err(format!("Method expired or not found: {from}:{}", clip(method)));
        };
        if spec.visibility == Visibility::Protected
            && remote_ws != self.workspace()
            && !spec.authorized_workspaces.iter().any(|w| w == remote_ws)
            && Some(from) != self.manager_address().as_deref()
        {
            return Err(format!("Permission denied for invoking protected method {}", clip(method)));
        }
        Ok(Some(InvokeTarget::Service { service: svc.into(), function: path.into() }))
    }

    /// Calls of our `built-in` service (PROTOCOL.md §6.2), answered by the engine itself.
    /// A reassembled large message comes back in the second slot, to be dispatched once the
    /// `process` call is answered.
    pub(super) fn builtin_call(
        &mut self,
        now: Instant,
        path: &str,
        extra: &Map,
        frame: &Frame,
    ) -> (Result<Value, RemoteError>, Option<Frame>) {
        if let Some(op) = path.strip_prefix("message_cache.") {
            return self.message_cache(now, op, extra, frame);
        }
        (self.builtin_simple(path, extra, frame), None)
    }

    pub(super) fn builtin_simple(
        &self,
        path: &str,
        extra: &Map,
        frame: &Frame,
    ) -> Result<Value, RemoteError> {
        let err = |message: String| RemoteError { message, trace: None, other: Map::new() };
        let (args, kw) = split_kwargs(extra);
        let arg = |i: usize, name: &str| args.get(i).or_else(|| kw.and_then(|k| k.get(name)));
        match path {
            "ping" => match arg(0, "msg").and_then(Value::as_str) {
                Some("ping") => Ok("pong".into()),
                _ => Err(err("ping expects the message \"ping\"".into())),
            },
            "get_service" => {
                let id = arg(0, "service_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| err("get_service needs a service id".into()))?;
                // The manager asks with `ws` set to our workspace; callers elsewhere need
                // visibility public/unlisted or an authorized workspace.
                let caller_ws = frame.main.get("ws").and_then(Value::as_str).unwrap_or_default();
                let local = id.rsplit_once(':').map_or(id, |(_, s)| s);
                let local = local.split_once('@').map_or(local, |(s, _)| s);
                let server = self.info.as_ref().map(|i| i.public_base_url.clone()).unwrap_or_default();
                let me = self.me();
                if local == "built-in" {
                    return Ok(self.builtin_spec().served(&server, me));
                }
                let spec = self
                    .services
                    .iter()
                    .find(|s| s.id == local)
                    .ok_or_else(|| err(format!("Service not found: {id}")))?;
                if spec.visibility == Visibility::Protected
                    && caller_ws != self.workspace()
                    && !spec.authorized_workspaces.iter().any(|w| w == caller_ws)
                {
                    return Err(err(format!("Permission denied for getting protected service: {id}")));
                }
                Ok(spec.served(&server, me))
            }
            _ => Err(err(format!("Method not found: built-in.{path}"))),
        }
    }

    /// `message_cache.{create, append, set, process, remove}`: chunked uploads to us
    /// (PROTOCOL.md §7.3). Keys are private to the peer that created them.
    pub(super) fn message_cache(
        &mut self,
        now: Instant,
        op: &str,
        extra: &Map,
        frame: &Frame,
    ) -> (Result<Value, RemoteError>, Option<Frame>) {
        let err = |message: String| RemoteError { message, trace: None, other: Map::new() };
        let (args, kw) = split_kwargs(extra);
        let arg = |i: usize, name: &str| args.get(i).or_else(|| kw.and_then(|k| k.get(name)));
        let flag = |i: usize, name: &str| arg(i, name).and_then(Value::as_bool).unwrap_or(false);
        let owner = frame.main_str("from").unwrap_or_default().to_string();
        let Some(key) = arg(0, "key").and_then(Value::as_str).map(String::from) else {
            return (Err(err("message_cache needs a string key".into())), None);
        };
        if key.len() > 256 {
            return (Err(err("message_cache key longer than 256 bytes".into())), None);
        }
        let limits = &self.config.limits;
        let (result, heartbeat) = match op {
            "create" => (
                self.reassembly.create(now, &key, &owner, flag(2, "overwrite"), limits),
                flag(1, "heartbeat"),
            ),
            "append" | "set" => {
                let (index, data_at, hb_at) =
                    if op == "set" { (arg(1, "index").map(Value::as_u64), 2, 3) } else { (None, 1, 2) };
                let index = match index {
                    Some(None) => {
                        return (Err(err("chunk index must be a non-negative integer".into())), None);
                    }
                    Some(Some(i)) => Some(i),
                    None if op == "set" => return (Err(err("set needs a chunk index".into())), None),
                    None => None,
                };
                match arg(data_at, "data").and_then(Value::as_bin) {
                    Some(data) => (
                        self.reassembly.add(now, &key, &owner, index, data.clone(), limits),
                        flag(hb_at, "heartbeat"),
                    ),
                    None => return (Err(err("chunk data must be bytes".into())), None),
                }
            }
            "remove" => (self.reassembly.remove(&key, &owner), false),
            "process" => {
                self.touch_session_of(now, &key, &owner, flag(1, "heartbeat"));
                let bytes = match self.reassembly.take(&key, &owner) {
                    Ok(b) => b,
                    Err(e) => return (Err(err(e.0)), None),
                };
                // A reassembled message may exceed one frame's caps, up to `max_message_bytes`.
                let mut limits = self.config.limits.clone();
                limits.max_frame_bytes = limits.max_message_bytes;
                limits.max_bin_len = limits.max_bin_len.max(limits.max_message_bytes);
                limits.max_str_len = limits.max_str_len.max(limits.max_message_bytes);
                let mut message = match decode_frame(&bytes, &limits) {
                    Ok(f) => f,
                    Err(e) => return (Err(err(format!("reassembled message {key} is invalid: {e}"))), None),
                };
                // The sender wrote the reassembled header; the trusted fields come from the
                // server's rewrite of the `process` call itself.
                for k in ["from", "to", "ws", "user"] {
                    match frame.main.get(k) {
                        Some(v) => {
                            message.main.insert(k, v.clone());
                        }
                        None => {
                            message.main.remove(k);
                        }
                    }
                }
                return (Ok(Value::Nil), Some(message));
            }
            _ => return (Err(err(format!("Method not found: message_cache.{op}"))), None),
        };
        if let (Err(e), true) = (&result, heartbeat) {
            // A chunked reply to our own call `key` that we cannot take: that call fails now
            // instead of waiting for its timeout.
            if self.sessions.get(&key).is_some_and(|p| p.target == owner) {
                self.reassembly.forget_key(&key);
                self.settle(now, key.clone(), Err(CallError::BadReply(format!("reply refused: {}", e.0))));
                return (Err(err(e.0.clone())), None);
            }
        }
        self.touch_session_of(now, &key, &owner, heartbeat);
        (result.map(|()| Value::Nil).map_err(|e| err(e.0)), None)
    }

    /// Like [`Engine::touch_session`], only when `key` is a call of ours to `peer`: a stranger's
    /// uploads must not keep our calls alive.
    pub(super) fn touch_session_of(&mut self, now: Instant, key: &str, peer: &str, heartbeat: bool) {
        if self.sessions.get(key).is_some_and(|p| p.target == peer) {
            self.touch_session(now, key, heartbeat);
        }
    }

    /// A chunked reply to our call `key` is arriving: its progress counts as a heartbeat.
    pub(super) fn touch_session(&mut self, now: Instant, key: &str, heartbeat: bool) {
        if !heartbeat {
            return;
        }
        if let Some(p) = self.sessions.get_mut(key) {
            p.heard = true;
            let old = p.deadline;
            p.deadline = now + p.timeout;
            let new = p.deadline;
            self.deadlines.remove(&(old, key.to_string()));
            self.deadlines.insert((new, key.to_string()));
        }
    }

    /// Answers a call the engine handles itself (or refuses) straight away.
    pub(super) fn answer_now(
        &mut self,
        now: Instant,
        route: &Route,
        caller: &str,
        session: Option<&str>,
        result: Result<Value, RemoteError>,
    ) -> Result<(), InputError> {
        let (slot, value) = match result {
            Ok(v) => (Slot::Resolve, v),
            Err(e) => (Slot::Reject, e.to_value()),
        };
        if let Some(addr) = slot_address(route, caller, session, slot) {
            let to = addr.0.clone();
            let mut frame = self.fire_frame(addr, session, Some(value));
            if let Some(key) = self.incoming_key {
                if self.seal_frame(&mut frame, &key).is_err() {
                    return Ok(()); // never in clear
                }
            }
            // Queueing fails only when the backlog is full; the caller then times out.
            let _ = self.send_reply(now, to, session.map(String::from), encode_frame(&frame));
        }
        Ok(())
    }

    /// Where replies to an incoming call go, and the heartbeat interval it asked for (clamped
    /// to [`Limits::min_heartbeat_interval`]).
    pub(super) fn promise_route(
        &self,
        extra: &Map,
        from: &str,
        session: Option<&str>,
    ) -> Result<(Route, Option<Duration>), InputError> {
        let min = self.config.limits.min_heartbeat_interval;
        let interval = |v: Option<&Value>| {
            v.and_then(Value::as_f64)
                .filter(|t| t.is_finite() && *t >= 0.0)
                .map(|t| Duration::from_secs_f64(t.min(86_400.0)).max(min))
        };
        match extra.get("promise") {
            None => Ok((Route::None, None)),
            Some(Value::Str(star)) if *star == "*" => {
                if session.is_none() {
                    return Err(InputError::Protocol("promise \"*\" without a session".into()));
                }
                Ok((Route::Compact, interval(extra.get("t"))))
            }
            Some(Value::Map(p)) => {
                let (ws, _) = split_client(from);
                let slot = |k: &str| -> Result<Option<Method>, InputError> {
                    match p.get(k) {
                        None | Some(Value::Nil) => Ok(None),
                        Some(v) => {
                            let mut m = Method::from_value(v)
                                .ok_or_else(|| InputError::Protocol(format!("promise.{k} is not a method")))?
                                .map_err(|e| InputError::Protocol(e.to_string()))?;
                            if !m.target.contains('/') {
                                m.target = format!("{ws}/{}", m.target);
                            }
                            Ok(Some(m))
                        }
                    }
                };
                let heartbeat = slot("heartbeat")?;
                let every = if heartbeat.is_some() { interval(p.get("interval")) } else { None };
                Ok((Route::Full(Box::new([slot("resolve")?, slot("reject")?, heartbeat])), every))
            }
            Some(other) => Err(InputError::Protocol(format!("promise is a {}", other.kind()))),
        }
    }
}
