//! Generators between two engines in memory: a service returns a local generator, the peer
//! pulls items until `stop_iteration` or closes it early; only that peer may pull, and
//! nothing stays behind afterwards.

use hypha_rpc_core::codec::rtype::{Generator, Method, PromiseMode, RTypeCodec, StopIteration};
use hypha_rpc_core::engine::{is_stop_iteration, local_generator};
use hypha_rpc_core::time::Instant;
use hypha_rpc_core::{
    CallError, CallId, CallOptions, Engine, EngineConfig, Event, FunctionSpec, GenId, InvokeTarget,
    ServiceSpec, Transmit, Value, Visibility,
};
use hypha_rpc_tests::drive;

const WS: &str = "ws-gen";
const T: Instant = Instant::ZERO;

fn engine(id: &str) -> Engine {
    let mut e = Engine::new(EngineConfig::new(id), T);
    drive::connect(&mut e, T, id, WS, "manager-x");
    e
}

/// A producer that yields `0..n` from generator `GenId(n)` and records closes.
struct World {
    consumer: Engine,
    producer: Engine,
    pulled: Vec<u64>,
    closed: Vec<GenId>,
    settled: Vec<(CallId, Result<Value, CallError>)>,
}

impl World {
    fn new() -> World {
        let consumer = engine("consumer");
        let mut producer = engine("producer");
        let svc = ServiceSpec::new("gen")
            .visibility(Visibility::Public)
            .function("count", FunctionSpec::new("count"));
        producer.register_service(T, svc).unwrap();
        drive::drain(&mut producer);
        World { consumer, producer, pulled: Vec::new(), closed: Vec::new(), settled: Vec::new() }
    }

    /// Moves frames until quiet; the producer answers `count(n)` with a generator and each
    /// `next` with the following number, or the end.
    fn pump(&mut self) {
        loop {
            let mut any = false;
            while let Some(Transmit::Binary(b)) = self.consumer.poll_transmit() {
                // Calls to a finished generator are refused (and reported as input errors).
                let _ = self.producer.handle_binary(T, &b);
                any = true;
            }
            while let Some(Transmit::Binary(b)) = self.producer.poll_transmit() {
                self.consumer.handle_binary(T, &b).unwrap();
                any = true;
            }
            while let Some(e) = self.producer.poll_event() {
                any = true;
                match e {
                    Event::Invoke(inv) => {
                        let reply = match inv.target {
                            InvokeTarget::Service { .. } => {
                                Ok(local_generator(GenId(inv.args[0].as_u64().unwrap())))
                            }
                            InvokeTarget::GeneratorNext { generator } => {
                                let next = self.pulled.len() as u64;
                                if next < generator.0 {
                                    self.pulled.push(next);
                                    Ok(Value::from(next))
                                } else {
                                    Ok(StopIteration.to_value())
                                }
                            }
                            other => panic!("unexpected {other:?}"),
                        };
                        self.producer.reply(T, inv.id, reply).unwrap();
                    }
                    Event::GeneratorClosed { generator } => self.closed.push(generator),
                    _ => {}
                }
            }
            while let Some(e) = self.consumer.poll_event() {
                if let Event::CallSettled { id, result } = e {
                    self.settled.push((id, result));
                }
            }
            if !any {
                return;
            }
        }
    }

    fn result(&mut self, id: CallId) -> Result<Value, CallError> {
        let i = self.settled.iter().position(|(c, _)| *c == id).expect("settled");
        self.settled.remove(i).1
    }

    fn open(&mut self, n: u64) -> Generator {
        let count = Method {
            target: format!("{WS}/producer"),
            method: "services.gen.count".into(),
            promise: Some(PromiseMode::Compact),
            ..Method::default()
        };
        let id = self.consumer.call(T, &count, vec![n.into()], None, CallOptions::default()).unwrap();
        self.pump();
        let v = self.result(id).unwrap();
        Generator::from_value(&v).expect("a generator").expect("valid")
    }
}

#[test]
fn items_until_stop_iteration_then_nothing_left() {
    let mut w = World::new();
    let g = w.open(3);
    assert_eq!(g.target, format!("{WS}/producer"));
    assert_eq!(w.producer.exports(), 1);
    let mut items = Vec::new();
    loop {
        let id = w.consumer.generator_next(T, &g).unwrap();
        w.pump();
        let v = w.result(id).unwrap();
        if is_stop_iteration(&v) {
            break;
        }
        items.push(v.as_u64().unwrap());
    }
    assert_eq!(items, [0, 1, 2]);
    assert_eq!(w.producer.exports(), 0, "the generator is freed at its end");
    assert!(w.closed.is_empty(), "an exhausted generator is not reported closed");
    // Pulling again fails: the generator is gone.
    let id = w.consumer.generator_next(T, &g).unwrap();
    w.pump();
    assert!(matches!(w.result(id), Err(CallError::Remote { message, .. }) if message.contains("not found")));
}

#[test]
fn early_close_frees_the_producer() {
    let mut w = World::new();
    let g = w.open(100);
    for _ in 0..2 {
        let id = w.consumer.generator_next(T, &g).unwrap();
        w.pump();
        w.result(id).unwrap();
    }
    let id = w.consumer.generator_close(T, &g).unwrap();
    w.pump();
    assert_eq!(w.result(id), Ok(Value::Bool(true)));
    assert_eq!(w.closed, [GenId(100)]);
    assert_eq!(w.producer.exports(), 0);
    assert_eq!(w.producer.active_invocations(), 0);
}

#[test]
fn only_the_consumer_may_pull() {
    let mut w = World::new();
    let g = w.open(5);
    let mut stranger = engine("stranger");
    let id = stranger.generator_next(T, &g).unwrap();
    while let Some(Transmit::Binary(b)) = stranger.poll_transmit() {
        let _ = w.producer.handle_binary(T, &b);
    }
    let mut refused = false;
    while let Some(Transmit::Binary(b)) = w.producer.poll_transmit() {
        stranger.handle_binary(T, &b).unwrap();
    }
    while let Some(e) = stranger.poll_event() {
        if let Event::CallSettled { id: got, result: Err(CallError::Remote { message, .. }) } = e {
            refused = got == id && message.contains("Access denied");
        }
    }
    assert!(refused, "a stranger's next is refused");
    assert!(w.pulled.is_empty(), "and reaches no user code");
    assert_eq!(w.producer.exports(), 1, "the consumer's generator is untouched");
}

/// The prefetching reader keeps items in order whatever order answers arrive in, drops pulls
/// an async Python producer refused ("already running"), and then pulls one at a time.
#[test]
fn prefetch_reader_orders_items_and_survives_refused_pulls() {
    use hypha_rpc_core::GeneratorReader;
    let mut e = engine("reader");
    let g = Generator {
        target: format!("{WS}/producer"),
        method: "S.g".into(),
        close_method: Some("S.g:close".into()),
        promise: Some(PromiseMode::Compact),
        ..Generator::default()
    };
    let mut r = GeneratorReader::new(g, 3);
    r.pump(&mut e, T).unwrap();
    assert_eq!(r.in_flight(), 3);
    assert_eq!(drive::drain(&mut e).frames.len(), 3, "three pulls went out");
    // Call ids are consecutive: the next call's id tells the three pulls' ids.
    let probe = e.generator_next(T, &Generator::default()).unwrap();
    let first = CallId(probe.0 - 3);
    let (a, b, c) = (first, CallId(first.0 + 1), CallId(first.0 + 2));
    let refused = Err(CallError::Remote {
        message: "RuntimeError: anext(): asynchronous generator is already running".into(),
        trace: None,
    });
    assert!(r.handle_settled(c, Ok(Value::from(2))));
    assert_eq!(r.poll_item(), None, "the first answer is missing: nothing yet");
    assert!(r.handle_settled(b, refused));
    assert!(r.handle_settled(a, Ok(Value::from(1))));
    assert_eq!(r.poll_item(), Some(Ok(Value::from(1))));
    assert_eq!(r.poll_item(), Some(Ok(Value::from(2))), "the refused pull is skipped, order kept");
    assert_eq!(r.poll_item(), None);
    r.pump(&mut e, T).unwrap();
    assert_eq!(r.in_flight(), 1, "after a refusal, one pull at a time");
    assert!(!r.handle_settled(CallId(999_999), Ok(Value::Nil)), "not one of ours");
    let last = CallId(first.0 + 4);
    assert!(r.handle_settled(last, Ok(StopIteration.to_value())));
    assert_eq!(r.poll_item(), None);
    assert!(r.is_finished());
    assert_eq!(r.close(&mut e, T).unwrap(), None, "an ended generator needs no close");
}

/// Closing the producer engine frees what it served and says so.
#[test]
fn closing_the_producer_frees_its_generators() {
    let mut w = World::new();
    let _g = w.open(5);
    assert_eq!(w.producer.exports(), 1);
    w.producer.close(T);
    assert_eq!((w.producer.exports(), w.producer.open_generators()), (0, 0));
    let mut closed = Vec::new();
    while let Some(e) = w.producer.poll_event() {
        if let Event::GeneratorClosed { generator } = e {
            closed.push(generator);
        }
    }
    assert_eq!(closed, [GenId(5)]);
}
