//! The Kinesis source: shards read in parallel, resharding followed, positions checkpointed.
//!
//! * [`decode`]: JSON records into Arrow rows, bad records into dead-letter rows.
//! * [`reader`]: one task per shard polling `GetRecords`, with back-off and retries.
//! * [`source`]: shard discovery, parent-before-child ordering, micro-batches, per-shard
//!   watermarks and checkpoint barriers.
//! * [`producer`]: `PutRecords` with rate limiting and retries of failed records
//!   (`healer produce`).

pub mod decode;
pub mod producer;
pub mod reader;
pub mod source;

use std::cmp::Ordering;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::http::HttpResponse;
use aws_sdk_kinesis::config::{Credentials, Region};
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};

use aws_sdk_kinesis::types::Shard;

use crate::config::KinesisConfig;
use crate::source::SourceError;

/// A Kinesis sequence number: up to 56 decimal digits, more than fits in a `u128`. Ordered
/// as (number of significant digits, digits), which is numeric order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SequenceNumber(String);

impl SequenceNumber {
    /// Parses decimal digits.
    pub fn parse(s: &str) -> Option<Self> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| Self(s.to_string()))
    }

    /// The digits as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn significant(&self) -> &str {
        let s = self.0.trim_start_matches('0');
        if s.is_empty() { "0" } else { s }
    }
}

impl Ord for SequenceNumber {
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (self.significant(), other.significant());
        a.len().cmp(&b.len()).then_with(|| a.cmp(b))
    }
}

impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// How a failed call should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Over a limit: wait and try again.
    Throttled,
    /// The shard iterator expired: get a new one from the last position.
    ExpiredIterator,
    /// A network error, a timeout or a 5xx: try again.
    Transient,
    /// Anything else: give up.
    Fatal,
}

/// Classifies an SDK error.
pub fn classify<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> Failure {
    match err {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            Failure::Transient
        }
        SdkError::ServiceError(e) => match e.err().code() {
            Some(
                "ProvisionedThroughputExceededException"
                | "LimitExceededException"
                | "KMSThrottlingException"
                | "ThrottlingException",
            ) => Failure::Throttled,
            Some("ExpiredIteratorException") => Failure::ExpiredIterator,
            Some("InternalFailure" | "InternalFailureException" | "ServiceUnavailable") => {
                Failure::Transient
            }
            // A 5xx without a recognised code (some emulators answer 500 with no body).
            _ if e.raw().status().is_server_error() => Failure::Transient,
            _ => Failure::Fatal,
        },
        _ => Failure::Fatal,
    }
}

/// A message for an SDK error, with its code when the service sent one.
pub fn describe<E: ProvideErrorMetadata + std::error::Error, R: std::fmt::Debug>(
    err: &SdkError<E, R>,
) -> String {
    match err {
        SdkError::ServiceError(e) => match (e.err().code(), e.err().message()) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c.to_string(),
            _ => format!("{}", e.err()),
        },
        other => format!("{other}"),
    }
}

/// Jittered exponential back-off: the `attempt`-th wait (0-based), at most `cap`.
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16));
    let ceiling = exp.min(cap);
    // "Full jitter" between half the ceiling and the ceiling.
    let half = ceiling / 2;
    half + Duration::from_micros(fastrand::u64(0..=half.as_micros() as u64))
}

/// Waits out the `attempt`-th retry ([`backoff`] from `base`, at most 5 s) and counts it.
pub async fn pause(attempt: &mut u32, base: Duration) {
    tokio::time::sleep(backoff(*attempt, base, Duration::from_secs(5))).await;
    *attempt += 1;
}

/// The AWS settings of `config` (region, static keys if given, otherwise the standard AWS
/// chain) for a client of `endpoint`, with the given retries and per-attempt timeout.
pub async fn sdk_config(
    config: &KinesisConfig,
    endpoint: Option<&str>,
    retry: RetryConfig,
    attempt_timeout: Duration,
) -> aws_config::SdkConfig {
    let keys = match (&config.access_key_id, &config.secret_access_key) {
        (Some(id), Some(secret)) => Some((id.as_str(), secret.as_str())),
        _ => None,
    };
    aws_settings(
        config.region.as_deref(),
        endpoint,
        keys,
        retry,
        attempt_timeout,
    )
    .await
}

/// AWS settings for any healer client: `region` (default: the standard chain's), an
/// `endpoint` override, static `keys` (id, secret) or the standard credential chain, the
/// given retries, a per-attempt timeout and a 3 s connect timeout.
pub async fn aws_settings(
    region: Option<&str>,
    endpoint: Option<&str>,
    keys: Option<(&str, &str)>,
    retry: RetryConfig,
    attempt_timeout: Duration,
) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(retry)
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(attempt_timeout)
                .connect_timeout(Duration::from_secs(3))
                .build(),
        );
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_string()));
    }
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some((id, secret)) = keys {
        loader = loader.credentials_provider(Credentials::new(id, secret, None, None, "healer"));
    }
    loader.load().await
}

/// A Kinesis client for `config`: its region and endpoint, static keys if given, otherwise
/// the standard AWS chain. The SDK's own retries are off: callers retry with their own
/// back-off, so throttling is visible in healer's metrics.
pub async fn client(config: &KinesisConfig) -> Client {
    Client::new(
        &sdk_config(
            config,
            config.endpoint.as_deref(),
            RetryConfig::disabled(),
            Duration::from_secs(10),
        )
        .await,
    )
}

/// Every shard of `stream` (name or ARN): `ListShards`, all pages, throttling and transient
/// errors retried with back-off.
pub async fn list_shards(client: &Client, stream: &str) -> Result<Vec<Shard>, SourceError> {
    let (name, arn) = stream_ref(stream);
    let mut shards = Vec::new();
    let mut token: Option<String> = None;
    let mut attempt = 0;
    loop {
        let call = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client
                .list_shards()
                .set_stream_name(name.clone())
                .set_stream_arn(arn.clone()),
        };
        match call.send().await {
            Ok(out) => {
                attempt = 0;
                shards.extend(out.shards().iter().cloned());
                match out.next_token() {
                    Some(t) if !t.is_empty() => token = Some(t.to_string()),
                    _ => return Ok(shards),
                }
            }
            Err(e) => match classify(&e) {
                Failure::Throttled | Failure::Transient if attempt < 8 => {
                    pause(&mut attempt, Duration::from_millis(200)).await;
                }
                _ => {
                    return Err(SourceError::Kinesis {
                        operation: "ListShards".into(),
                        reason: describe(&e),
                    });
                }
            },
        }
    }
}

/// A shard's parents (after a split or merge: one; after a merge: two).
pub fn parents_of(shard: &Shard) -> Vec<String> {
    [shard.parent_shard_id(), shard.adjacent_parent_shard_id()]
        .into_iter()
        .flatten()
        .map(str::to_string)
        .collect()
}

/// The stream's name and ARN from `stream` (either form).
pub fn stream_ref(stream: &str) -> (Option<String>, Option<String>) {
    if stream.starts_with("arn:") {
        (None, Some(stream.to_string()))
    } else {
        (Some(stream.to_string()), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_order_numerically() {
        let s = |x: &str| SequenceNumber::parse(x).unwrap();
        let long = "49590338271490256608559692538361571095921575989136588898";
        let longer = "49590338271490256608559692538361571095921575989136588899";
        assert!(s(long) < s(longer));
        assert!(s("9") < s("10"), "not string order");
        assert!(s("0010") == s("10").max(s("0010")) || s("0010").cmp(&s("10")).is_eq());
        assert!(s("9223372036854775807") < s(long));
        assert!(SequenceNumber::parse("12a").is_none());
        assert!(SequenceNumber::parse("").is_none());
    }

    #[test]
    fn backoff_is_bounded_and_grows() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        for attempt in 0..40 {
            let d = backoff(attempt, base, cap);
            assert!(d <= cap);
            assert!(d >= (base * (1 << attempt.min(6))).min(cap) / 2);
        }
    }
}
