//! A tier that may not exist, as a backend (`kind = "sim"`): a simulated device
//! (`serrano_sim::live::Device`: the engine's scheduler and block allocator stepping on the
//! wall clock, each step as long as the device's performance model says) paces the tokens, so
//! routing, budgets, dashboards and benchmarks meet it at the pace it would have.
//!
//! The tokens come from this process's engine (`tokens = "engine"`: the local backend renders,
//! checks and generates; each generated token is held until the device releases its
//! sequence's next one, so a token comes out at the later of the two paces), or are filler
//! (`tokens = "synthetic"`: no model runs; the prompt is rendered and counted by the engine's
//! tokenizer, and every choice is `max_tokens` tokens of [`FILLER`], released at the device's
//! pace, finishing with `length`). Synthetic output honours no field that shapes text
//! (`stop`, log-probs, `echo`, tools, `response_format`: each a 400 naming it); sampling
//! parameters have nothing to act on.

use futures::StreamExt;
use serrano_engine::EngineHandle;
use serrano_sim::live::{Device, Refusal, Sequence, Sink};
use tokio::sync::watch;

use crate::backend::{
    AttemptCtx, Backend, BackendError, Delta, Event, EventStream, Generation, Prepared, Request,
};
use crate::error::ApiError;
use crate::local::LocalBackend;

/// The text of every synthetic token.
pub const FILLER: &str = " sim";

pub struct SimBackend {
    local: LocalBackend,
    device: Device,
    synthetic: bool,
}

impl SimBackend {
    /// `engine` renders (and, unless `synthetic`, generates) for `device`.
    pub fn new(name: &str, engine: EngineHandle, device: Device, synthetic: bool) -> SimBackend {
        SimBackend {
            local: LocalBackend::new(name, engine),
            device,
            synthetic,
        }
    }
}

/// Tells a sequence's stream how many of its tokens the device has released.
struct Released(watch::Sender<u64>);

impl Sink for Released {
    fn release(&mut self, released: u64) -> bool {
        self.0.send(released).is_ok()
    }

    fn gone(&self) -> bool {
        self.0.is_closed()
    }
}

fn refusal(r: Refusal) -> BackendError {
    match r {
        Refusal::TooLong { .. } => BackendError::refused(ApiError::invalid(r.to_string())),
        Refusal::Busy => BackendError::busy(ApiError::busy(r)),
        Refusal::Stopped => BackendError::failed(ApiError::internal(r)),
    }
}

/// The first field a synthetic generation cannot honour.
fn synthetic_unsupported(gen: &Generation) -> Option<ApiError> {
    let no = |field: &str| {
        Some(ApiError::invalid_param(
            field,
            format!(
                "'{field}' is not supported by a synthetic sim backend (its tokens are filler)"
            ),
        ))
    };
    let extra = gen.request.extra();
    if !gen.stop.is_empty() {
        return no("stop");
    }
    if gen.logprobs.is_some() {
        return no("logprobs");
    }
    let (sampling, echo) = match &gen.request {
        Request::Chat(r) => (&r.sampling, false),
        Request::Completion(r) => (&r.sampling, r.echo),
    };
    if echo {
        return no("echo");
    }
    if sampling
        .stop_token_ids
        .as_ref()
        .is_some_and(|s| !s.is_empty())
    {
        return no("stop_token_ids");
    }
    let text_format = extra
        .get("response_format")
        .is_none_or(|f| f.is_null() || f["type"] == "text");
    if !text_format {
        return no("response_format");
    }
    let tools = extra
        .get("tools")
        .and_then(|t| t.as_array())
        .is_some_and(|t| !t.is_empty());
    if tools && !extra.get("tool_choice").is_some_and(|c| c == "none") {
        return no("tools");
    }
    // `functions` and the rest of what the engine cannot honour: the local backend's own
    // checks, in its rendering.
    None
}

#[async_trait::async_trait]
impl Backend for SimBackend {
    fn name(&self) -> &str {
        self.local.name()
    }

    fn kind(&self) -> &'static str {
        "sim"
    }

    fn context_length(&self, model: &str) -> Option<u64> {
        self.local.context_length(model)
    }

    fn exact_tally(&self) -> bool {
        // The engine's deltas are one token each, and so are the filler's.
        true
    }

    fn load(&self) -> Option<serrano_sim::live::Load> {
        Some(self.device.load())
    }

    /// The engine that renders for it (`/tokenize` of its model names, `/metrics`).
    fn engine(&self) -> Option<&EngineHandle> {
        self.local.engine()
    }

    async fn prepare(&self, gen: &Generation, model: &str) -> Result<Prepared, BackendError> {
        let inner = if self.synthetic {
            if let Some(e) = synthetic_unsupported(gen) {
                return Err(BackendError::refused(e));
            }
            self.local.render_only(gen).await?
        } else {
            self.local.prepare(gen, model).await?
        };
        let max = usize::try_from(inner.max_tokens).unwrap_or(usize::MAX);
        let prompt = usize::try_from(inner.prompt_tokens).unwrap_or(usize::MAX);
        self.device.check_fits(prompt, max).map_err(refusal)?;
        Ok(Prepared::new(inner.prompt_tokens, inner.max_tokens, inner))
    }

    async fn generate(
        &self,
        gen: &Generation,
        work: Prepared,
        ctx: &AttemptCtx,
    ) -> Result<EventStream, BackendError> {
        let inner: Prepared = work.into_work()?;
        let (prompt_tokens, max_tokens) = (inner.prompt_tokens, inner.max_tokens);
        let prompt = LocalBackend::prompt_of(&inner)
            .ok_or_else(|| BackendError::failed(ApiError::internal("no rendered prompt")))?
            .to_vec();
        // As the engine's own prefix cache: on unless `--no-prefix-caching`.
        let cacheable = self.local.engine().is_some_and(|e| e.info().prefix_caching);
        let mut paces = Vec::with_capacity(gen.n);
        let mut seqs = Vec::with_capacity(gen.n);
        for _ in 0..gen.n {
            let (tx, rx) = watch::channel(0u64);
            paces.push(rx);
            seqs.push(Sequence {
                tenant: gen.tenant.clone(),
                class: gen.class,
                prompt: prompt.clone(),
                max_tokens: usize::try_from(max_tokens).unwrap_or(usize::MAX),
                cacheable,
                sink: Box::new(Released(tx)),
            });
        }
        self.device.submit(seqs).map_err(refusal)?;
        if self.synthetic {
            return Ok(synthetic(paces, prompt_tokens, max_tokens));
        }
        // Dropping the paces (an engine refusal) takes the sequences off the device.
        let events = self.local.generate(gen, inner, ctx).await?;
        Ok(paced(events, paces))
    }
}

/// The engine's events, each generated token held until the device has released as many of
/// its choice's; a choice's pace is dropped when it finishes (its sequence leaves the device).
fn paced(events: EventStream, paces: Vec<watch::Receiver<u64>>) -> EventStream {
    let taken = vec![0u64; paces.len()];
    let paces: Vec<Option<watch::Receiver<u64>>> = paces.into_iter().map(Some).collect();
    futures::stream::unfold(
        (events, paces, taken),
        |(mut events, mut paces, mut taken)| async move {
            let event = events.next().await?;
            match &event {
                Event::Delta(Delta {
                    index,
                    generated: true,
                    ..
                }) => {
                    let i = *index as usize;
                    if let (Some(slot), Some(n)) = (paces.get_mut(i), taken.get_mut(i)) {
                        *n += 1;
                        let want = *n;
                        let released = match slot {
                            Some(rx) => rx.wait_for(|&r| r >= want).await.is_ok(),
                            None => true,
                        };
                        if !released {
                            // The device let the sequence go (it reached max_tokens, or
                            // stopped): the engine's tokens go at its own pace.
                            *slot = None;
                        }
                    }
                }
                Event::Finish { index, .. } => {
                    if let Some(slot) = paces.get_mut(*index as usize) {
                        *slot = None;
                    }
                }
                _ => {}
            }
            Some((event, (events, paces, taken)))
        },
    )
    .boxed()
}

/// `max_tokens` filler tokens per choice as the device releases them, each choice finishing
/// with `length`, then the usage.
fn synthetic(paces: Vec<watch::Receiver<u64>>, prompt_tokens: u64, max_tokens: u64) -> EventStream {
    let choices = paces.len() as u64;
    let streams = paces.into_iter().enumerate().map(|(index, rx)| {
        futures::stream::unfold((rx, 0u64), move |(mut rx, sent)| async move {
            let index = index as u32;
            if sent > max_tokens {
                return None;
            }
            if sent == max_tokens {
                let finish = Event::Finish {
                    index,
                    reason: "length".into(),
                    extra: Default::default(),
                };
                return Some((finish, (rx, sent + 1)));
            }
            if rx.wait_for(|&r| r > sent).await.is_err() {
                let e = ApiError::internal("the simulated device stopped");
                return Some((Event::Error(BackendError::failed(e)), (rx, max_tokens + 1)));
            }
            let delta = Delta {
                index,
                text: FILLER.into(),
                generated: true,
                ..Default::default()
            };
            Some((Event::Delta(delta), (rx, sent + 1)))
        })
        .boxed()
    });
    let usage = Event::Usage {
        prompt_tokens,
        completion_tokens: choices.saturating_mul(max_tokens),
    };
    // Nothing follows an error.
    futures::stream::select_all(streams)
        .chain(futures::stream::once(async move { usage }))
        .scan(false, |stopped, event| {
            let out = (!*stopped).then(|| {
                *stopped = matches!(event, Event::Error(_));
                event
            });
            futures::future::ready(out)
        })
        .boxed()
}
