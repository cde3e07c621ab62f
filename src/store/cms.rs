//! The CMS's own table, `cms_asset_references`, where a command touches it beside the CMS:
//! counting its rows (`status`, `backup`) and the demo playing the CMS. The daemon reads the
//! rows it plans from through `source`, never here.

use sqlx::SqlitePool;

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
        count_cms_rows(&self.pool).await
    }

    /// Inserts `rows` in one transaction, as a CMS export would.
    pub async fn insert_cms_rows(&self, rows: &[CmsRow]) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        for row in rows {
            sqlx::query(
                "INSERT INTO cms_asset_references (asset_id, uri, additional) VALUES (?, ?, ?)",
            )
            .bind(&row.asset_id)
            .bind(&row.uri)
            .bind(&row.additional)
            .execute(&mut *tx)
            .await?;
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
        sqlx::query("UPDATE cms_asset_references SET additional = ? WHERE uri = ? AND asset_id = ?")
            .bind(additional)
            .bind(uri)
            .bind(asset_id)
            .execute(&self.pool)
            .await
            .map(drop)
    }

    /// Removes every CMS row of a page.
    pub async fn delete_cms_uri(&self, uri: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM cms_asset_references WHERE uri = ?")
            .bind(uri)
            .execute(&self.pool)
            .await
            .map(drop)
    }

    /// CMS rows whose asset id looks like a Bynder id (hex digits and dashes), for the demo's
    /// closing check.
    pub async fn cms_rows_with_bynder_ids(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT count(*) FROM cms_asset_references WHERE asset_id GLOB '[0-9A-F]*-*'",
        )
        .fetch_one(&self.pool)
        .await
    }
}

pub(super) async fn count_cms_rows(pool: &SqlitePool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM cms_asset_references")
        .fetch_one(pool)
        .await
}
