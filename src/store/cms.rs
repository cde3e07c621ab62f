//! The CMS's own table, `cms_asset_references`, where a command touches it beside the CMS:
//! counting its rows (`status`, `backup`) and the demo playing the CMS. The daemon reads the
//! rows it plans from through `source`, never here.

use super::db::{on_pool, on_tx};
use super::Store;

/// One row as a CMS writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmsRow {
    pub asset_id: String,
    pub uri: String,
    pub additional: Option<String>,
}

impl Store {
    /// Rows in `cms_asset_references`, usable or not.
    pub async fn cms_row_count(&self) -> Result<i64, sqlx::Error> {
        on_pool!(&self.db, |pool, pg| sqlx::query_scalar(
            "SELECT count(*) FROM cms_asset_references"
        )
        .fetch_one(pool)
        .await)
    }

    /// Inserts `rows` in one transaction, as a CMS export would.
    pub async fn insert_cms_rows(&self, rows: &[CmsRow]) -> Result<(), sqlx::Error> {
        let mut tx = self.db.begin().await?;
        for row in rows {
            on_tx!(&mut tx, |conn, pg| sqlx::query(
                "INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES ($1, $2, $3)",
            )
            .bind(&row.asset_id)
            .bind(&row.uri)
            .bind(&row.additional)
            .execute(&mut *conn)
            .await
            .map(|r| r.rows_affected()))?;
        }
        tx.commit().await
    }

    /// Changes the note of one CMS row.
    pub async fn set_cms_additional(
        &self,
        asset_id: &str,
        uri: &str,
        additional: &str,
    ) -> Result<(), sqlx::Error> {
        on_pool!(&self.db, |pool, pg| sqlx::query(
            "UPDATE cms_asset_references SET additional = $1 WHERE uri = $2 AND asset_id = $3"
        )
        .bind(additional)
        .bind(uri)
        .bind(asset_id)
        .execute(pool)
        .await
        .map(drop))
    }

    /// Removes every CMS row of a page.
    pub async fn delete_cms_uri(&self, uri: &str) -> Result<(), sqlx::Error> {
        on_pool!(&self.db, |pool, pg| sqlx::query(
            "DELETE FROM cms_asset_references WHERE uri = $1"
        )
        .bind(uri)
        .execute(pool)
        .await
        .map(drop))
    }

    /// CMS rows whose asset id looks like a Bynder id (hex digits and dashes), for the demo's
    /// closing check.
    pub async fn cms_rows_with_bynder_ids(&self) -> Result<i64, sqlx::Error> {
        on_pool!(&self.db, |pool, pg| sqlx::query_scalar(if pg {
            "SELECT count(*) FROM cms_asset_references WHERE asset_id ~ '^[0-9A-F].*-'"
        } else {
            "SELECT count(*) FROM cms_asset_references WHERE asset_id GLOB '[0-9A-F]*-*'"
        })
        .fetch_one(pool)
        .await)
    }
}
