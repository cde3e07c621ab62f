use futures::TryStreamExt;
use sqlx::Row;
#[tokio::main]
async fn main() {
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename("/tmp/perf.db")
        .row_buffer_size(8192);
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    for q in [
        "SELECT CAST(asset_id AS BLOB), CAST(uri AS BLOB), CAST(additional AS BLOB), typeof(asset_id) = 'text' AND typeof(uri) = 'text' FROM (SELECT asset_id, uri, additional FROM cms_asset_references) ORDER BY asset_id COLLATE BINARY, uri COLLATE BINARY, additional COLLATE BINARY",
        "SELECT asset_id, uri, additional FROM recorded_usages ORDER BY asset_id, uri",
    ] {
        let t = std::time::Instant::now();
        let mut s = sqlx::query(q).fetch(&pool);
        let mut n = 0u64;
        while let Some(r) = s.try_next().await.unwrap() {
            let _a: Vec<u8> = r.get(0);
            n += 1;
        }
        println!("{n} rows {:?}", t.elapsed());
    }
    let t = std::time::Instant::now();
    let mut n = 0;
    let mut last: Option<(String, String)> = None;
    loop {
        let (a, u) = last.clone().unwrap_or_default();
        let page: String = sqlx::query_scalar("SELECT group_concat(hex(asset_id) || ',' || hex(uri) || ',' || hex(additional), ';') FROM (SELECT asset_id, uri, additional FROM cms_asset_references WHERE (asset_id, uri) > (?, ?) ORDER BY asset_id, uri LIMIT 5000)")
            .bind(&a).bind(&u).fetch_one(&pool).await.unwrap_or_default();
        if page.is_empty() {
            break;
        }
        let mut lastrow = "";
        for row in page.split(';') {
            n += 1;
            lastrow = row;
        }
        let mut parts = lastrow.split(',');
        let dec = |h: &str| {
            String::from_utf8(
                (0..h.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                    .collect(),
            )
            .unwrap()
        };
        last = Some((dec(parts.next().unwrap()), dec(parts.next().unwrap())));
    }
    println!("paged {n} rows {:?}", t.elapsed());
}
