//! SQL over the incident log (`healer incidents`).
//!
//! Registers `<out>/anomalies/` as the table `anomalies` (with the `date` partition column)
//! and, when present, `<out>/dead_letter/` as `dead_letter`, `<out>/dead_letter_records/`
//! (records a stream source could not decode) as `dead_letter_records` and
//! `<out>/incidents/` (written by `healer diagnose`) as `incidents`, then runs a query with
//! DataFusion. The log is deduplicated by construction (deterministic ids and file names),
//! so `anomalies` is a plain view of the files.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::Result;
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use object_store::ObjectStore;

use crate::store::Location;

/// The default query of `healer incidents`.
pub const DEFAULT_QUERY: &str = "SELECT ts, resource, metric, round(value, 3) AS value, round(score, 2) AS score, \
     severity, rule FROM anomalies ORDER BY severity = 'CRITICAL' DESC, abs(score) DESC, ts LIMIT 20";

async fn has_files(location: &Location, table: &str) -> bool {
    let prefix = location.child(table);
    location.store.list(Some(&prefix)).next().await.is_some()
}

async fn register(ctx: &SessionContext, location: &Location, table: &str) -> Result<()> {
    let base = location.url.as_str().trim_end_matches('/');
    let url = format!(
        "{base}/{}/{table}/",
        location.path.as_ref().trim_matches('/')
    );
    let url = ListingTableUrl::parse(&url)?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(vec![("date".to_string(), DataType::Utf8)]);
    let state = ctx.state();
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .infer_schema(&state)
        .await?;
    ctx.register_table(table, Arc::new(ListingTable::try_new(config)?))?;
    Ok(())
}

/// A DataFusion context with the incident log of `location` registered.
pub async fn context(location: &Location) -> Result<SessionContext> {
    let ctx = SessionContext::new();
    let store: Arc<dyn ObjectStore> = Arc::clone(&location.store);
    ctx.runtime_env()
        .register_object_store(&location.url, store);
    for table in [
        "anomalies",
        "dead_letter",
        "dead_letter_records",
        "incidents",
        "remediations",
    ] {
        if has_files(location, table).await {
            register(&ctx, location, table).await?;
        }
    }
    Ok(ctx)
}

/// Runs `sql` over the log.
pub async fn query(location: &Location, sql: &str) -> Result<Vec<RecordBatch>> {
    let ctx = context(location).await?;
    ctx.sql(sql).await?.collect().await
}

/// Runs `sql` over the local parquet file or folder `path`, registered as `table`; errors
/// name the path.
pub async fn query_parquet(
    path: &str,
    table: &str,
    sql: &str,
) -> std::result::Result<Vec<RecordBatch>, String> {
    let ctx = SessionContext::new();
    let run = async {
        ctx.register_parquet(table, path, Default::default())
            .await?;
        ctx.sql(sql).await?.collect().await
    };
    run.await.map_err(|e| format!("{path}: {e}"))
}
