//! Length-prefixed frames: a big-endian `u32` length, then that many bytes of JSON.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Frames larger than this are refused, so a confused peer cannot make us allocate gigabytes.
/// It fits the largest block (64 MiB) with room for its envelope.
pub const MAX_FRAME: usize = 80 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Writes one message as a JSON frame.
pub async fn write<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    write_bytes(w, &serde_json::to_vec(msg)?).await
}

/// Reads one JSON frame and decodes it. A clean end of stream before the length is `Closed`.
pub async fn read<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(&read_bytes(r).await?)?)
}

/// Writes one frame of raw bytes.
pub async fn write_bytes<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> Result<(), FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(body).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame of raw bytes. A clean end of stream before the length is `Closed`.
pub async fn read_bytes<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_refuse_oversized_lengths() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write(&mut a, &vec!["status".to_string()]).await.unwrap();
        let got: Vec<String> = read(&mut b).await.unwrap();
        assert_eq!(got, vec!["status".to_string()]);

        a.write_all(&(u32::MAX).to_be_bytes()).await.unwrap();
        let err = read::<_, Vec<String>>(&mut b).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(_)), "{err}");

        drop(a);
        let err = read::<_, Vec<String>>(&mut b).await.unwrap_err();
        assert!(matches!(err, FrameError::Closed), "{err}");
    }
}
