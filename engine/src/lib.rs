//! healer's runtime: sources, the dataflow, event time, sinks and the `healer` binary.
//!
//! * [`message`]: the one message type on every edge and its ordering contract.
//! * [`source`]: `ParquetSource`, event-time-ordered replay of parquet over object_store.
//! * [`gate`]: watermarks, bounded out-of-orderness and late data.
//! * [`job`]: the replay job: gate, keyed workers running the rules, merge, sinks.
//! * [`stream`]: the streaming job (`healer run`) over the same pipeline, with checkpoints.
//! * [`kinesis`]: the Kinesis source (shards, resharding, decoding) and producer.
//! * [`checkpoint`]: aligned checkpoints, their store, and restore.
//! * [`sink`]: the parquet incident log and the dead-letter output.
//! * [`query`]: SQL over the incident log.
//! * [`diagnose`]: incidents with root cause and decision from the logged anomalies.
//! * [`llm`]: the Bedrock consult of the decision engine.
//! * [`petshop`]: root-cause evaluation on the PetShop data set.
//! * [`nab_eval`]: detection quality on NAB with NAB's scoring.
//! * [`smd_eval`]: the isolation forest on SMD: F1, AUROC, AUPRC, culprit metrics.
//! * [`config`]: the pipeline configuration and its validation.
//! * [`train`]: training data for models (parquet or CSV).

pub mod checkpoint;
pub mod config;
pub mod demo;
pub mod diagnose;
pub mod gate;
pub mod job;
pub mod kinesis;
pub mod lease;
pub mod live;
pub mod llm;
pub mod message;
pub mod metrics;
pub mod nab_eval;
pub mod notify;
pub mod petshop;
pub mod query;
pub mod remedy;
pub mod sink;
pub mod smd_eval;
pub mod source;
pub mod store;
pub mod stream;
pub mod train;
