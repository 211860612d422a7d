//! A minimal asynchronous QMP (QEMU Machine Protocol) client.
//!
//! Hand-written rather than using the `qapi` crate: the driver needs only a handful of
//! commands (`stop`, `cont`, `migrate`, `migrate-incoming`, `query-migrate`, `quit`,
//! `human-monitor-command`), `qapi` pulls in a large generated schema tied to particular
//! QEMU versions, and a line-delimited JSON exchange over a Unix socket is ~100 lines.
//! The driver opens one connection per operation and drops it afterwards, so no socket
//! stays open between operations (QEMU's QMP server accepts one client at a time and
//! buffers events for a connected client that does not read them).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::vmm::VmmError;

/// Time allowed for one QMP command to answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
}

fn ctl(msg: impl Into<String>) -> VmmError {
    VmmError::Control(msg.into())
}

impl Qmp {
    /// Connect, read the greeting and negotiate capabilities.
    pub(crate) async fn connect(socket: &Path) -> Result<Qmp, VmmError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| ctl(format!("connect {}: {e}", socket.display())))?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
        };
        let greeting = tokio::time::timeout(COMMAND_TIMEOUT, qmp.read_msg())
            .await
            .map_err(|_| ctl("timed out waiting for the QMP greeting"))??;
        if greeting.get("QMP").is_none() {
            return Err(ctl(format!("unexpected QMP greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_msg(&mut self) -> Result<Value, VmmError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .await
                .map_err(|e| ctl(format!("QMP read: {e}")))?;
            if n == 0 {
                return Err(ctl("QMP connection closed"));
            }
            let trimmed = line.trim();
            if trimmed.is_empty() {
                continue;
            }
            return serde_json::from_str(trimmed)
                .map_err(|e| ctl(format!("QMP: bad JSON {trimmed:?}: {e}")));
        }
    }

    /// Run a command and return its `return` value. Events are skipped.
    pub(crate) async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .await
            .map_err(|e| ctl(format!("QMP write ({command}): {e}")))?;
        let wait = async {
            loop {
                let reply = self.read_msg().await?;
                if reply.get("event").is_some() {
                    continue;
                }
                if reply.get("id").and_then(Value::as_u64) != Some(id) {
                    continue;
                }
                if let Some(ret) = reply.get("return") {
                    return Ok(ret.clone());
                }
                if let Some(err) = reply.get("error") {
                    let desc = err
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error");
                    return Err(ctl(format!("{command}: {desc}")));
                }
                return Err(ctl(format!("{command}: unexpected reply {reply}")));
            }
        };
        tokio::time::timeout(COMMAND_TIMEOUT, wait)
            .await
            .map_err(|_| ctl(format!("{command}: no answer within {COMMAND_TIMEOUT:?}")))?
    }

    /// Run an HMP command through `human-monitor-command` and return its output.
    pub(crate) async fn hmp(&mut self, command_line: &str) -> Result<String, VmmError> {
        let ret = self
            .execute(
                "human-monitor-command",
                Some(json!({ "command-line": command_line })),
            )
            .await?;
        Ok(ret.as_str().unwrap_or_default().to_string())
    }
}

/// Parse `info usernet` output into `(guest_port, host_port)` pairs of TCP host
/// forwards, e.g. `  TCP[HOST_FORWARD]  13  127.0.0.1 40123  10.0.2.15  8080  0  0`.
pub(crate) fn parse_usernet(text: &str) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 || !fields[0].starts_with("TCP[HOST_FORWARD]") {
            continue;
        }
        let (Ok(host_port), Ok(guest_port)) = (fields[3].parse::<u16>(), fields[5].parse::<u16>())
        else {
            continue;
        };
        out.push((guest_port, host_port));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::parse_usernet;

    #[test]
    fn parses_info_usernet() {
        let text = "Hub -1 (net0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n  TCP[HOST_FORWARD]  13       127.0.0.1 40123       10.0.2.15  8080     0     0\r\n  TCP[HOST_FORWARD]  14       127.0.0.1 40125       10.0.2.15  8081     0     0\r\n  UDP[236 sec]       15       10.0.2.15   68    10.0.2.2    67     0     0\r\n";
        assert_eq!(parse_usernet(text), vec![(8080, 40123), (8081, 40125)]);
    }
}
