//! Durable metadata: VMs, routes, snapshots, images and API keys in SQLite
//! (`$HATCH_DATA_DIR/hatch.db`), schema managed by migrations.

use std::path::Path;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow};
use sqlx::{Row, SqlitePool};

use crate::model::{ts, Image, Route, SleepMode, Snapshot, Vm, VmEvent, VmState};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint refused the write (e.g. a subdomain taken by a racing request).
    #[error("already exists")]
    Conflict,
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrate: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

fn parse_ts(s: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("timestamp {s:?}: {e}")))
}

fn map_conflict(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict,
        _ => StoreError::Db(e),
    }
}

fn vm_from_row(r: &SqliteRow) -> Result<Vm> {
    let state: String = r.try_get("state")?;
    Ok(Vm {
        id: r.try_get("id")?,
        image_id: r.try_get("image_id")?,
        user_id: r.try_get("user_id")?,
        state: VmState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("vm state {state:?}")))?,
        vcpu_count: r.try_get::<i64, _>("vcpu_count")? as u32,
        mem_mib: r.try_get::<i64, _>("mem_mib")? as u32,
        boot_args: r.try_get("boot_args")?,
        user_data: r.try_get("user_data")?,
        enable_network: r.try_get("enable_network")?,
        boot_count: r.try_get("boot_count")?,
        restore_count: r.try_get("restore_count")?,
        last_error: r.try_get("last_error")?,
        idle_timeout: r
            .try_get::<Option<i64>, _>("idle_timeout_ms")?
            .map(|ms| std::time::Duration::from_millis(ms.max(0) as u64)),
        idle_check_interval: r
            .try_get::<Option<i64>, _>("idle_check_interval_ms")?
            .map(|ms| std::time::Duration::from_millis(ms.max(0) as u64)),
        sleep_mode: match r.try_get::<String, _>("sleep_mode")?.as_str() {
            "stop" => SleepMode::Stop,
            _ => SleepMode::Snapshot,
        },
        last_activity_at: r
            .try_get::<Option<String>, _>("last_activity_at")?
            .map(|s| parse_ts(&s))
            .transpose()?,
        created_at: parse_ts(&r.try_get::<String, _>("created_at")?)?,
        updated_at: parse_ts(&r.try_get::<String, _>("updated_at")?)?,
    })
}

fn route_from_row(r: &SqliteRow) -> Result<Route> {
    Ok(Route {
        id: r.try_get("id")?,
        vm_id: r.try_get("vm_id")?,
        subdomain: r.try_get("subdomain")?,
        target_port: r.try_get::<i64, _>("target_port")? as u16,
        auto_wake: r.try_get("auto_wake")?,
        created_at: parse_ts(&r.try_get::<String, _>("created_at")?)?,
        updated_at: parse_ts(&r.try_get::<String, _>("updated_at")?)?,
    })
}

fn snapshot_from_row(r: &SqliteRow) -> Result<Snapshot> {
    Ok(Snapshot {
        id: r.try_get("id")?,
        vm_id: r.try_get("vm_id")?,
        state_key: r.try_get("state_key")?,
        size_bytes: r.try_get("size_bytes")?,
        created_at: parse_ts(&r.try_get::<String, _>("created_at")?)?,
    })
}

fn image_from_row(r: &SqliteRow) -> Result<Image> {
    Ok(Image {
        id: r.try_get("id")?,
        kernel_path: r.try_get("kernel_path")?,
        rootfs_path: r.try_get("rootfs_path")?,
        boot_args: r.try_get("boot_args")?,
        created_at: parse_ts(&r.try_get::<String, _>("created_at")?)?,
    })
}

impl Store {
    /// Opens (creating if needed) `dir/hatch.db` and runs the migrations.
    pub async fn open_dir(dir: &Path) -> Result<Store> {
        let opts = SqliteConnectOptions::new()
            .filename(dir.join("hatch.db"))
            .create_if_missing(true);
        Self::open(opts).await
    }

    /// Opens a `sqlite:` URL.
    pub async fn open_url(url: &str) -> Result<Store> {
        let opts = SqliteConnectOptions::from_str(url)?.create_if_missing(true);
        Self::open(opts).await
    }

    async fn open(opts: SqliteConnectOptions) -> Result<Store> {
        let opts = opts
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Store { pool })
    }

    // ---- images ----

    /// Inserts the image unless one with that id exists (an existing row is kept).
    pub async fn ensure_image(&self, img: &Image) -> Result<bool> {
        let res = sqlx::query(
            "INSERT OR IGNORE INTO images (id, kernel_path, rootfs_path, boot_args, created_at) VALUES (?,?,?,?,?)",
        )
        .bind(&img.id)
        .bind(&img.kernel_path)
        .bind(&img.rootfs_path)
        .bind(&img.boot_args)
        .bind(ts(&img.created_at))
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    pub async fn get_image(&self, id: &str) -> Result<Option<Image>> {
        let row = sqlx::query("SELECT * FROM images WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(image_from_row).transpose()
    }

    pub async fn list_images(&self) -> Result<Vec<Image>> {
        let rows = sqlx::query("SELECT * FROM images ORDER BY created_at DESC, rowid DESC")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(image_from_row).collect()
    }

    // ---- vms ----

    pub async fn insert_vm(&self, vm: &Vm) -> Result<()> {
        sqlx::query(
            "INSERT INTO vms (id, image_id, user_id, state, vcpu_count, mem_mib, boot_args, user_data, enable_network, boot_count, restore_count, last_error, created_at, updated_at, idle_timeout_ms, idle_check_interval_ms, sleep_mode, last_activity_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        )
        .bind(&vm.id)
        .bind(&vm.image_id)
        .bind(&vm.user_id)
        .bind(vm.state.as_str())
        .bind(vm.vcpu_count as i64)
        .bind(vm.mem_mib as i64)
        .bind(&vm.boot_args)
        .bind(&vm.user_data)
        .bind(vm.enable_network)
        .bind(vm.boot_count)
        .bind(vm.restore_count)
        .bind(&vm.last_error)
        .bind(ts(&vm.created_at))
        .bind(ts(&vm.updated_at))
        .bind(vm.idle_timeout.map(|d| d.as_millis() as i64))
        .bind(vm.idle_check_interval.map(|d| d.as_millis() as i64))
        .bind(vm.sleep_mode.as_str())
        .bind(vm.last_activity_at.as_ref().map(ts))
        .execute(&self.pool)
        .await
        .map_err(map_conflict)?;
        Ok(())
    }

    /// Records when the VM was last active.
    pub async fn set_last_activity(&self, id: &str, at: DateTime<Utc>) -> Result<()> {
        sqlx::query("UPDATE vms SET last_activity_at = ? WHERE id = ?")
            .bind(ts(&at))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Appends an event to the VM's log, keeping the newest 200.
    pub async fn add_event(
        &self,
        vm_id: &str,
        kind: &str,
        detail: &serde_json::Value,
    ) -> Result<()> {
        sqlx::query("INSERT INTO vm_events (vm_id, at, kind, detail) VALUES (?,?,?,?)")
            .bind(vm_id)
            .bind(ts(&Utc::now()))
            .bind(kind)
            .bind(detail.to_string())
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "DELETE FROM vm_events WHERE vm_id = ? AND id NOT IN (SELECT id FROM vm_events WHERE vm_id = ? ORDER BY id DESC LIMIT 200)",
        )
        .bind(vm_id)
        .bind(vm_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The VM's events, newest first.
    pub async fn list_events(&self, vm_id: &str) -> Result<Vec<VmEvent>> {
        let rows =
            sqlx::query("SELECT at, kind, detail FROM vm_events WHERE vm_id = ? ORDER BY id DESC")
                .bind(vm_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(VmEvent {
                    at: parse_ts(&r.try_get::<String, _>("at")?)?,
                    kind: r.try_get("kind")?,
                    detail: serde_json::from_str(&r.try_get::<String, _>("detail")?)
                        .unwrap_or(serde_json::Value::Null),
                })
            })
            .collect()
    }

    pub async fn get_vm(&self, id: &str) -> Result<Option<Vm>> {
        let row = sqlx::query("SELECT * FROM vms WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(vm_from_row).transpose()
    }

    pub async fn list_vms(&self, user_id: Option<&str>) -> Result<Vec<Vm>> {
        let rows = match user_id {
            Some(u) => {
                sqlx::query(
                    "SELECT * FROM vms WHERE user_id = ? ORDER BY created_at DESC, rowid DESC",
                )
                .bind(u)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query("SELECT * FROM vms ORDER BY created_at DESC, rowid DESC")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(vm_from_row).collect()
    }

    pub async fn count_vms(&self, user_id: &str) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM vms WHERE user_id = ?")
                .bind(user_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Records a new state. `error` is stored as `last_error` when given; a move to
    /// `running` clears it.
    pub async fn set_vm_state(&self, id: &str, state: VmState, error: Option<&str>) -> Result<()> {
        let now = ts(&Utc::now());
        if state == VmState::Running {
            sqlx::query("UPDATE vms SET state = ?, last_error = NULL, updated_at = ? WHERE id = ?")
                .bind(state.as_str())
                .bind(now)
                .bind(id)
                .execute(&self.pool)
                .await?;
        } else {
            sqlx::query(
                "UPDATE vms SET state = ?, last_error = COALESCE(?, last_error), updated_at = ? WHERE id = ?",
            )
            .bind(state.as_str())
            .bind(error)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// Marks the VM running after a boot (`restored == false`) or a restore.
    pub async fn record_wake(&self, id: &str, restored: bool) -> Result<()> {
        let col = if restored {
            "restore_count"
        } else {
            "boot_count"
        };
        sqlx::query(&format!(
            "UPDATE vms SET state = 'running', last_error = NULL, {col} = {col} + 1, updated_at = ? WHERE id = ?"
        ))
        .bind(ts(&Utc::now()))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes the VM with its routes and snapshot rows.
    pub async fn delete_vm(&self, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM proxy_routes WHERE vm_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM snapshots WHERE vm_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM vm_events WHERE vm_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let res = sqlx::query("DELETE FROM vms WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(res.rows_affected() == 1)
    }

    // ---- routes ----

    pub async fn insert_route(&self, r: &Route) -> Result<()> {
        sqlx::query(
            "INSERT INTO proxy_routes (id, vm_id, subdomain, target_port, auto_wake, created_at, updated_at) VALUES (?,?,?,?,?,?,?)",
        )
        .bind(&r.id)
        .bind(&r.vm_id)
        .bind(&r.subdomain)
        .bind(r.target_port as i64)
        .bind(r.auto_wake)
        .bind(ts(&r.created_at))
        .bind(ts(&r.updated_at))
        .execute(&self.pool)
        .await
        .map_err(map_conflict)?;
        Ok(())
    }

    pub async fn list_routes(&self, vm_id: Option<&str>) -> Result<Vec<Route>> {
        let rows = match vm_id {
            Some(v) => sqlx::query(
                "SELECT * FROM proxy_routes WHERE vm_id = ? ORDER BY created_at DESC, rowid DESC",
            )
            .bind(v)
            .fetch_all(&self.pool)
            .await?,
            None => {
                sqlx::query("SELECT * FROM proxy_routes ORDER BY created_at DESC, rowid DESC")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(route_from_row).collect()
    }

    pub async fn get_route(&self, id: &str) -> Result<Option<Route>> {
        let row = sqlx::query("SELECT * FROM proxy_routes WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(route_from_row).transpose()
    }

    pub async fn subdomain_taken(&self, subdomain: &str) -> Result<bool> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM proxy_routes WHERE subdomain = ?")
            .bind(subdomain)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    pub async fn delete_route(&self, id: &str) -> Result<bool> {
        let res = sqlx::query("DELETE FROM proxy_routes WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected() == 1)
    }

    // ---- snapshots ----

    pub async fn insert_snapshot(&self, s: &Snapshot) -> Result<()> {
        sqlx::query(
            "INSERT INTO snapshots (id, vm_id, state_key, size_bytes, created_at) VALUES (?,?,?,?,?)",
        )
        .bind(&s.id)
        .bind(&s.vm_id)
        .bind(&s.state_key)
        .bind(s.size_bytes)
        .bind(ts(&s.created_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Snapshots of a VM, newest first.
    pub async fn list_snapshots(&self, vm_id: &str) -> Result<Vec<Snapshot>> {
        let rows = sqlx::query(
            "SELECT * FROM snapshots WHERE vm_id = ? ORDER BY created_at DESC, rowid DESC",
        )
        .bind(vm_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(snapshot_from_row).collect()
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM snapshots WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- api keys ----

    pub async fn count_keys(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn insert_key(&self, id: &str, user_id: &str, key_hash: &str) -> Result<()> {
        sqlx::query("INSERT INTO api_keys (id, user_id, key_hash, created_at) VALUES (?,?,?,?)")
            .bind(id)
            .bind(user_id)
            .bind(key_hash)
            .bind(ts(&Utc::now()))
            .execute(&self.pool)
            .await
            .map_err(map_conflict)?;
        Ok(())
    }

    /// The user owning the key with this hash.
    pub async fn key_user(&self, key_hash: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT user_id FROM api_keys WHERE key_hash = ?")
                .bind(key_hash)
                .fetch_optional(&self.pool)
                .await?,
        )
    }
}
