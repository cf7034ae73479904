//! The lease table: one item per shard, in the Kinesis Client Library's schema.
//!
//! | attribute | type | meaning |
//! |---|---|---|
//! | `leaseKey` | S | shard id (hash key) |
//! | `leaseOwner` | S | worker id; absent when free |
//! | `leaseCounter` | N | bumped by every write of the owner: renewals prove liveness, and every write is conditional on it (fencing) |
//! | `checkpoint` | S | last sequence number processed, or `TRIM_HORIZON`, `AT_TIMESTAMP`, `SHARD_END` |
//! | `checkpointSubSequenceNumber` | N | always 0 (healer does not de-aggregate KPL records) |
//! | `ownerSwitchesSinceCheckpoint` | N | owner changes since the last checkpoint |
//! | `parentShardId` | SS | parents after a split or merge |
//! | `childShardIds` | SS | children, once known |
//! | `startingHashKey`, `endingHashKey` | S | the shard's hash-key range |
//! | `healerState` | S | object holding the shard's keyed state at the checkpoint |
//! | `healerMaxTs` | N | largest event time read from the shard at the checkpoint |
//! | `healerStartMs` | N | with `AT_TIMESTAMP`: where the shard starts |
//! | `healerHandoffTo` | S | a worker that asked the owner to hand the lease over |
//!
//! Two implementations: [`LeaseTable::dynamodb`] and [`LeaseTable::memory`] (the same
//! conditional semantics, for tests of the protocol).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ProvisionedThroughput, ReturnValue, ReturnValuesOnConditionCheckFailure, ScalarAttributeType,
    TableStatus, TransactWriteItem, Update,
};

use super::HashRange;
use crate::config::{KinesisConfig, LeaseConfig};

/// One lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The shard id (`leaseKey`).
    pub key: String,
    /// The owner (`leaseOwner`), `None` when free.
    pub owner: Option<String>,
    /// `leaseCounter`.
    pub counter: u64,
    /// `checkpoint`: a sequence number or one of the sentinels.
    pub checkpoint: String,
    /// `ownerSwitchesSinceCheckpoint`.
    pub owner_switches: u64,
    /// `parentShardId`.
    pub parents: Vec<String>,
    /// `childShardIds`.
    pub children: Vec<String>,
    /// `startingHashKey` … `endingHashKey`.
    pub range: HashRange,
    /// `healerState`.
    pub state: Option<String>,
    /// `healerMaxTs`.
    pub max_ts: Option<i64>,
    /// `healerStartMs`.
    pub start_ms: Option<i64>,
    /// `healerHandoffTo`.
    pub handoff_to: Option<String>,
}

impl Lease {
    /// A new, free lease for a shard.
    pub fn new(key: &str, parents: Vec<String>, range: HashRange, checkpoint: &str) -> Self {
        Self {
            key: key.to_string(),
            owner: None,
            counter: 0,
            checkpoint: checkpoint.to_string(),
            owner_switches: 0,
            parents,
            children: Vec::new(),
            range,
            state: None,
            max_ts: None,
            start_ms: None,
            handoff_to: None,
        }
    }

    /// Whether the shard was read to its end.
    pub fn finished(&self) -> bool {
        self.checkpoint == super::SHARD_END
    }

    /// The sequence number to resume after, if the lease has one.
    pub fn sequence(&self) -> Option<&str> {
        (!self.checkpoint.is_empty() && self.checkpoint.bytes().all(|b| b.is_ascii_digit()))
            .then_some(self.checkpoint.as_str())
    }
}

/// What one checkpoint writes to one lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseCheckpoint {
    /// The lease.
    pub key: String,
    /// The counter the writer holds (the write fails if it moved).
    pub counter: u64,
    /// New `checkpoint`.
    pub checkpoint: String,
    /// New `healerState`.
    pub state: String,
    /// New `healerMaxTs`.
    pub max_ts: Option<i64>,
}

/// Errors of the lease table.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    /// A conditional write failed: the lease changed (another owner, a newer counter).
    #[error("lease {0} changed under us (taken or renewed by another worker)")]
    Conflict(String),
    /// The store failed (network, throttling, a missing table).
    #[error("lease table: {0}")]
    Store(String),
}

/// A lease table. See the [module docs](self).
#[derive(Debug, Clone)]
pub enum LeaseTable {
    /// DynamoDB.
    Dynamo {
        /// The client.
        client: Client,
        /// The table.
        table: String,
    },
    /// In memory (tests).
    Memory(Arc<Mutex<BTreeMap<String, Lease>>>),
}

fn store_error<E: ProvideErrorMetadata + std::error::Error, R: std::fmt::Debug>(
    what: &str,
    e: &SdkError<E, R>,
) -> LeaseError {
    LeaseError::Store(format!("{what}: {}", crate::kinesis::describe(e)))
}

fn is_conditional<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    matches!(e, SdkError::ServiceError(s) if s.err().code() == Some("ConditionalCheckFailedException"))
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn item_of(lease: &Lease) -> HashMap<String, AttributeValue> {
    let mut item = HashMap::from([
        ("leaseKey".to_string(), s(&lease.key)),
        ("leaseCounter".to_string(), n(lease.counter)),
        ("checkpoint".to_string(), s(&lease.checkpoint)),
        ("checkpointSubSequenceNumber".to_string(), n(0)),
        (
            "ownerSwitchesSinceCheckpoint".to_string(),
            n(lease.owner_switches),
        ),
        (
            "startingHashKey".to_string(),
            s(&lease.range.start.to_string()),
        ),
        ("endingHashKey".to_string(), s(&lease.range.end.to_string())),
    ]);
    if let Some(o) = &lease.owner {
        item.insert("leaseOwner".into(), s(o));
    }
    if !lease.parents.is_empty() {
        item.insert(
            "parentShardId".into(),
            AttributeValue::Ss(lease.parents.clone()),
        );
    }
    if !lease.children.is_empty() {
        item.insert(
            "childShardIds".into(),
            AttributeValue::Ss(lease.children.clone()),
        );
    }
    if let Some(v) = &lease.state {
        item.insert("healerState".into(), s(v));
    }
    if let Some(v) = lease.max_ts {
        item.insert("healerMaxTs".into(), n(v));
    }
    if let Some(v) = lease.start_ms {
        item.insert("healerStartMs".into(), n(v));
    }
    if let Some(v) = &lease.handoff_to {
        item.insert("healerHandoffTo".into(), s(v));
    }
    item
}

fn lease_of(item: &HashMap<String, AttributeValue>) -> Result<Lease, LeaseError> {
    let key = item
        .get("leaseKey")
        .and_then(|v| v.as_s().ok())
        .ok_or_else(|| LeaseError::Store("an item without leaseKey".into()))?
        .clone();
    let bad = |what: &str| LeaseError::Store(format!("lease {key}: bad or missing {what}"));
    let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
    let number = |name: &str| -> Result<Option<i64>, LeaseError> {
        item.get(name)
            .map(|v| {
                v.as_n()
                    .ok()
                    .and_then(|x| x.parse::<i64>().ok())
                    .ok_or_else(|| bad(name))
            })
            .transpose()
    };
    let set = |name: &str| {
        item.get(name)
            .and_then(|v| v.as_ss().ok())
            .cloned()
            .unwrap_or_default()
    };
    let range = match (text("startingHashKey"), text("endingHashKey")) {
        (Some(a), Some(b)) => HashRange::parse(&a, &b).ok_or_else(|| bad("hash key range"))?,
        // A lease written by another tool without the range: the whole space.
        _ => HashRange::ALL,
    };
    let mut parents = set("parentShardId");
    parents.sort();
    let mut children = set("childShardIds");
    children.sort();
    Ok(Lease {
        owner: text("leaseOwner"),
        counter: number("leaseCounter")?.ok_or_else(|| bad("leaseCounter"))? as u64,
        checkpoint: text("checkpoint").unwrap_or_else(|| super::TRIM_HORIZON.into()),
        owner_switches: number("ownerSwitchesSinceCheckpoint")?.unwrap_or(0) as u64,
        parents,
        children,
        range,
        state: text("healerState"),
        max_ts: number("healerMaxTs")?,
        start_ms: number("healerStartMs")?,
        handoff_to: text("healerHandoffTo"),
        key,
    })
}

impl LeaseTable {
    /// An empty in-memory table.
    pub fn memory() -> Self {
        Self::Memory(Arc::default())
    }

    /// The DynamoDB table of `config` (region and keys as for the stream), created when
    /// missing and `create_table` is set. Waits until it is active.
    pub async fn dynamodb(
        config: &LeaseConfig,
        kinesis: &KinesisConfig,
    ) -> Result<Self, LeaseError> {
        // The SDK retries here (the writes recognise their own retried writes).
        let sdk = crate::kinesis::sdk_config(
            kinesis,
            config.endpoint.as_deref(),
            RetryConfig::standard().with_max_attempts(3),
            Duration::from_secs(5),
        )
        .await;
        let client = Client::new(&sdk);
        let table = config.table.clone();
        let described = client.describe_table().table_name(&table).send().await;
        match described {
            Ok(_) => {}
            Err(e) if matches!(&e, SdkError::ServiceError(s) if s.err().is_resource_not_found_exception()) =>
            {
                if !config.create_table {
                    return Err(LeaseError::Store(format!(
                        "lease table `{table}` does not exist (set lease.create_table = true, or create it with hash key leaseKey (S))"
                    )));
                }
                let mut create = client
                    .create_table()
                    .table_name(&table)
                    .attribute_definitions(
                        AttributeDefinition::builder()
                            .attribute_name("leaseKey")
                            .attribute_type(ScalarAttributeType::S)
                            .build()
                            .expect("complete"),
                    )
                    .key_schema(
                        KeySchemaElement::builder()
                            .attribute_name("leaseKey")
                            .key_type(KeyType::Hash)
                            .build()
                            .expect("complete"),
                    );
                create = if config.billing_mode == "PROVISIONED" {
                    create
                        .billing_mode(BillingMode::Provisioned)
                        .provisioned_throughput(
                            ProvisionedThroughput::builder()
                                .read_capacity_units(config.read_capacity)
                                .write_capacity_units(config.write_capacity)
                                .build()
                                .expect("complete"),
                        )
                } else {
                    create.billing_mode(BillingMode::PayPerRequest)
                };
                match create.send().await {
                    Ok(_) => tracing::info!(%table, "lease table created"),
                    // Another worker created it at the same time.
                    Err(e) if matches!(&e, SdkError::ServiceError(s) if s.err().code() == Some("ResourceInUseException")) =>
                        {}
                    Err(e) => return Err(store_error("CreateTable", &e)),
                }
            }
            Err(e) => return Err(store_error("DescribeTable", &e)),
        }
        for _ in 0..120 {
            let out = client
                .describe_table()
                .table_name(&table)
                .send()
                .await
                .map_err(|e| store_error("DescribeTable", &e))?;
            if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                return Ok(Self::Dynamo { client, table });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(LeaseError::Store(format!(
            "lease table `{table}` did not become active"
        )))
    }

    /// Every lease (a consistent scan).
    pub async fn list(&self) -> Result<Vec<Lease>, LeaseError> {
        match self {
            Self::Memory(m) => Ok(m.lock().expect("not poisoned").values().cloned().collect()),
            Self::Dynamo { client, table } => {
                let mut leases = Vec::new();
                let mut start: Option<HashMap<String, AttributeValue>> = None;
                loop {
                    let out = client
                        .scan()
                        .table_name(table)
                        .consistent_read(true)
                        .set_exclusive_start_key(start.take())
                        .send()
                        .await
                        .map_err(|e| store_error("Scan", &e))?;
                    for item in out.items() {
                        leases.push(lease_of(item)?);
                    }
                    match out.last_evaluated_key() {
                        Some(k) if !k.is_empty() => start = Some(k.clone()),
                        _ => break,
                    }
                }
                leases.sort_by(|a, b| a.key.cmp(&b.key));
                Ok(leases)
            }
        }
    }

    /// Creates `lease` unless one with its key exists; true when created.
    pub async fn create(&self, lease: &Lease) -> Result<bool, LeaseError> {
        match self {
            Self::Memory(m) => {
                let mut m = m.lock().expect("not poisoned");
                if m.contains_key(&lease.key) {
                    return Ok(false);
                }
                m.insert(lease.key.clone(), lease.clone());
                Ok(true)
            }
            Self::Dynamo { client, table } => {
                let put = client
                    .put_item()
                    .table_name(table)
                    .set_item(Some(item_of(lease)))
                    .condition_expression("attribute_not_exists(leaseKey)")
                    .send()
                    .await;
                match put {
                    Ok(_) => Ok(true),
                    Err(e) if is_conditional(&e) => Ok(false),
                    Err(e) => Err(store_error("PutItem", &e)),
                }
            }
        }
    }

    /// Adds `child` to the `childShardIds` of `parent` (a set: adding twice is harmless;
    /// only a missing parent lease is skipped).
    pub async fn add_child(&self, parent: &str, child: &str) -> Result<(), LeaseError> {
        match self {
            Self::Memory(m) => {
                if let Some(l) = m.lock().expect("not poisoned").get_mut(parent)
                    && !l.children.iter().any(|c| c == child)
                {
                    l.children.push(child.to_string());
                    l.children.sort();
                }
                Ok(())
            }
            Self::Dynamo { client, table } => client
                .update_item()
                .table_name(table)
                .key("leaseKey", s(parent))
                .update_expression("ADD childShardIds :c")
                .condition_expression("attribute_exists(leaseKey)")
                .expression_attribute_values(":c", AttributeValue::Ss(vec![child.to_string()]))
                .send()
                .await
                .map(|_| ())
                .or_else(|e| {
                    if is_conditional(&e) {
                        Ok(())
                    } else {
                        Err(store_error("UpdateItem", &e))
                    }
                }),
        }
    }

    /// One conditional update in memory: `check` decides, `apply` changes.
    fn memory_update(
        m: &Mutex<BTreeMap<String, Lease>>,
        key: &str,
        check: impl FnOnce(&Lease) -> bool,
        apply: impl FnOnce(&mut Lease),
    ) -> Result<Lease, LeaseError> {
        let mut m = m.lock().expect("not poisoned");
        match m.get_mut(key) {
            Some(l) if check(l) => {
                apply(l);
                Ok(l.clone())
            }
            _ => Err(LeaseError::Conflict(key.to_string())),
        }
    }

    /// One conditional `UpdateItem`. The SDK retries a call whose answer was lost, and
    /// the retry of a write that was applied fails its condition: when the item as it is
    /// now shows our write (`applied`), that is success, not a conflict.
    async fn dynamo_update(
        client: &Client,
        table: &str,
        key: &str,
        update: &str,
        condition: &str,
        values: Vec<(&str, AttributeValue)>,
        applied: impl Fn(&Lease) -> bool,
    ) -> Result<Lease, LeaseError> {
        let mut call = client
            .update_item()
            .table_name(table)
            .key("leaseKey", s(key))
            .update_expression(update)
            .condition_expression(condition)
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        for (k, v) in values {
            call = call.expression_attribute_values(k, v);
        }
        match call.send().await {
            Ok(out) => lease_of(out.attributes().ok_or_else(|| {
                LeaseError::Store(format!("lease {key}: UpdateItem returned no item"))
            })?),
            Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => {
                let now = match e.err() {
                    UpdateItemError::ConditionalCheckFailedException(c) => {
                        c.item().map(lease_of).transpose()?
                    }
                    _ => None,
                };
                match now {
                    Some(lease) if applied(&lease) => Ok(lease),
                    _ => Err(LeaseError::Conflict(key.to_string())),
                }
            }
            Err(e) => Err(store_error("UpdateItem", &e)),
        }
    }

    /// Renews a lease `me` owns at `counter`; returns it as it is now (a
    /// `healerHandoffTo` set by another worker shows there).
    pub async fn renew(&self, key: &str, me: &str, counter: u64) -> Result<Lease, LeaseError> {
        match self {
            Self::Memory(m) => Self::memory_update(
                m,
                key,
                |l| l.counter == counter && l.owner.as_deref() == Some(me),
                |l| l.counter += 1,
            ),
            Self::Dynamo { client, table } => {
                Self::dynamo_update(
                    client,
                    table,
                    key,
                    "SET leaseCounter = :next",
                    "leaseCounter = :c AND leaseOwner = :me",
                    vec![
                        (":next", n(counter + 1)),
                        (":c", n(counter)),
                        (":me", s(me)),
                    ],
                    |l| l.counter == counter + 1 && l.owner.as_deref() == Some(me),
                )
                .await
            }
        }
    }

    /// Takes a lease seen at `counter` (free, expired, or handed over).
    pub async fn take(&self, key: &str, me: &str, counter: u64) -> Result<Lease, LeaseError> {
        match self {
            Self::Memory(m) => Self::memory_update(
                m,
                key,
                |l| l.counter == counter,
                |l| {
                    l.counter += 1;
                    if l.owner.as_deref() != Some(me) {
                        l.owner_switches += 1;
                    }
                    l.owner = Some(me.to_string());
                    l.handoff_to = None;
                },
            ),
            Self::Dynamo { client, table } => {
                Self::dynamo_update(
                    client,
                    table,
                    key,
                    "SET leaseOwner = :me, leaseCounter = :next, \
                     ownerSwitchesSinceCheckpoint = \
                     if_not_exists(ownerSwitchesSinceCheckpoint, :zero) + :one \
                     REMOVE healerHandoffTo",
                    "leaseCounter = :c",
                    vec![
                        (":me", s(me)),
                        (":next", n(counter + 1)),
                        (":c", n(counter)),
                        (":one", n(1)),
                        (":zero", n(0)),
                    ],
                    |l| l.counter == counter + 1 && l.owner.as_deref() == Some(me),
                )
                .await
            }
        }
    }

    /// Asks `owner` (seen at `counter`) to hand the lease over to `me`.
    pub async fn ask(
        &self,
        key: &str,
        owner: &str,
        counter: u64,
        me: &str,
    ) -> Result<(), LeaseError> {
        match self {
            Self::Memory(m) => Self::memory_update(
                m,
                key,
                |l| {
                    l.counter == counter
                        && l.owner.as_deref() == Some(owner)
                        && l.handoff_to.is_none()
                },
                |l| l.handoff_to = Some(me.to_string()),
            )
            .map(|_| ()),
            Self::Dynamo { client, table } => Self::dynamo_update(
                client,
                table,
                key,
                "SET healerHandoffTo = :me",
                "leaseCounter = :c AND leaseOwner = :owner \
                 AND attribute_not_exists(healerHandoffTo)",
                vec![(":me", s(me)), (":c", n(counter)), (":owner", s(owner))],
                |l| l.counter == counter && l.handoff_to.as_deref() == Some(me),
            )
            .await
            .map(|_| ()),
        }
    }

    /// Gives up a lease `me` owns at `counter`: it becomes free (a handoff request stays,
    /// so the asker knows it is meant for it).
    pub async fn release(&self, key: &str, me: &str, counter: u64) -> Result<Lease, LeaseError> {
        match self {
            Self::Memory(m) => Self::memory_update(
                m,
                key,
                |l| l.counter == counter && l.owner.as_deref() == Some(me),
                |l| {
                    l.counter += 1;
                    l.owner = None;
                },
            ),
            Self::Dynamo { client, table } => {
                Self::dynamo_update(
                    client,
                    table,
                    key,
                    "SET leaseCounter = :next REMOVE leaseOwner",
                    "leaseCounter = :c AND leaseOwner = :me",
                    vec![
                        (":next", n(counter + 1)),
                        (":c", n(counter)),
                        (":me", s(me)),
                    ],
                    |l| l.counter == counter + 1 && l.owner.is_none(),
                )
                .await
            }
        }
    }

    /// Writes one checkpoint to every lease in `updates`, all or none: each write is
    /// conditional on `me` owning the lease at its counter, and bumps the counter. On a
    /// conflict nothing is written and the error names a lease that changed.
    ///
    /// `token` makes the transaction idempotent for ten minutes: a retry of a commit whose
    /// answer was lost succeeds instead of failing its conditions.
    pub async fn commit(
        &self,
        me: &str,
        updates: &[LeaseCheckpoint],
        token: &str,
    ) -> Result<(), LeaseError> {
        if updates.is_empty() {
            return Ok(());
        }
        match self {
            Self::Memory(m) => {
                let mut m = m.lock().expect("not poisoned");
                for u in updates {
                    match m.get(&u.key) {
                        Some(l) if l.counter == u.counter && l.owner.as_deref() == Some(me) => {}
                        _ => return Err(LeaseError::Conflict(u.key.clone())),
                    }
                }
                for u in updates {
                    let l = m.get_mut(&u.key).expect("checked");
                    l.counter += 1;
                    l.checkpoint = u.checkpoint.clone();
                    l.owner_switches = 0;
                    l.state = Some(u.state.clone());
                    l.max_ts = u.max_ts;
                }
                Ok(())
            }
            Self::Dynamo { client, table } => {
                let mut call = client.transact_write_items().client_request_token(token);
                for u in updates {
                    let mut update = Update::builder()
                        .table_name(table)
                        .key("leaseKey", s(&u.key))
                        .condition_expression("leaseCounter = :c AND leaseOwner = :me")
                        .expression_attribute_values(":c", n(u.counter))
                        .expression_attribute_values(":me", s(me))
                        .expression_attribute_values(":next", n(u.counter + 1))
                        .expression_attribute_values(":cp", s(&u.checkpoint))
                        .expression_attribute_values(":zero", n(0))
                        .expression_attribute_values(":state", s(&u.state));
                    let mut expression = "SET leaseCounter = :next, checkpoint = :cp, \
                                          checkpointSubSequenceNumber = :zero, \
                                          ownerSwitchesSinceCheckpoint = :zero, healerState = :state"
                        .to_string();
                    if let Some(t) = u.max_ts {
                        expression.push_str(", healerMaxTs = :ts");
                        update = update.expression_attribute_values(":ts", n(t));
                    }
                    let update = update
                        .update_expression(expression)
                        .build()
                        .map_err(|e| LeaseError::Store(e.to_string()))?;
                    call = call.transact_items(TransactWriteItem::builder().update(update).build());
                }
                match call.send().await {
                    Ok(_) => {}
                    Err(SdkError::ServiceError(e))
                        if e.err().is_transaction_canceled_exception() =>
                    {
                        let reasons = match e.err() {
                            aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(t) => t.cancellation_reasons().to_vec(),
                            _ => Vec::new(),
                        };
                        let lost = reasons
                            .iter()
                            .position(|r| r.code() == Some("ConditionalCheckFailed"))
                            .map(|i| updates[i].key.clone());
                        return match lost {
                            Some(key) => Err(LeaseError::Conflict(key)),
                            None => Err(LeaseError::Store(format!(
                                "TransactWriteItems cancelled: {:?}",
                                reasons.iter().map(|r| r.code()).collect::<Vec<_>>()
                            ))),
                        };
                    }
                    Err(e) => return Err(store_error("TransactWriteItems", &e)),
                }
                Ok(())
            }
        }
    }
}
