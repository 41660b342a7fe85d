//! What the TLS tests share: the TLS server's verified superuser URL, a database with
//! one `items` table and a delete rule on it, and URLs without their passwords.

use super::db::TestDb;
use super::env::{pg_tls_url, tls_file};

/// The TLS server's superuser URL (`WAL2CACHE_TEST_PG_TLS`), verify-full against the
/// throwaway CA.
#[allow(dead_code)]
pub fn pg_tls_admin() -> String {
    format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg_tls_url(),
        tls_file("ca.pem")
    )
}

/// A database of its own on the server of `admin`, with `items (id int PRIMARY KEY,
/// name text)`.
#[allow(dead_code)]
pub async fn items_db_on(admin: &str, label: &str) -> TestDb {
    let db = TestDb::on(admin, label).await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, name text)")
        .await;
    db
}

/// One delete rule on `items`: the key `<prefix>:item:{id}`.
#[allow(dead_code)]
pub fn item_rules(prefix: &str) -> String {
    format!(
        "[[rule]]\nname = \"item\"\ntable = \"public.items\"\nkeys = [\"{prefix}:item:{{id}}\"]\n"
    )
}

/// `url` without the password of its user info (`scheme://user@host...`).
#[allow(dead_code)]
pub fn without_password(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (userinfo, host) = rest.split_once('@').unwrap();
    let user = userinfo.split(':').next().unwrap();
    format!("{scheme}://{user}@{host}")
}
