//! The paging token of instance and entity lists (`x-ms-continuation-token`, in the
//! request and the response): the store's token as base64url without padding. Opaque
//! to clients, and ASCII (so a valid header value) whatever the ids it stands for hold.

use axum::http::header::HeaderValue;
use axum::http::HeaderMap;
use axum::response::Response;

use crate::error::{ApiError, ApiResult};

/// The request and response header that carries the paging token of lists.
pub const CONTINUATION_HEADER: &str = "x-ms-continuation-token";

const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The store's token from a request's header: `None` without one (or with an empty one,
/// or `null`, which some clients send for the first page); 400 for a token this host
/// did not give out. `what` names the list in the message.
pub(crate) fn from_request(headers: &HeaderMap, what: &str) -> ApiResult<Option<String>> {
    let Some(value) = headers.get(CONTINUATION_HEADER) else { return Ok(None) };
    let token = value
        .to_str()
        .map_err(|_| ApiError::BadRequest(format!("the continuation token is not one of {what} (not ASCII)")))?
        .trim();
    if token.is_empty() || token == "null" {
        return Ok(None);
    }
    decode(token)
        .map(Some)
        .ok_or_else(|| ApiError::BadRequest(format!("'{token}' is not a continuation token of {what}")))
}

/// Puts the store's token, when there is one, into the response's header.
pub(crate) fn add_to_response(response: &mut Response, token: Option<&str>) {
    if let Some(token) = token {
        let value = HeaderValue::from_str(&encode(token)).expect("base64url is a valid header value");
        response.headers_mut().insert(CONTINUATION_HEADER, value);
    }
}

/// A token as the client sees it: base64url (no padding) of the store's.
fn encode(token: &str) -> String {
    let mut encoded = String::with_capacity(token.len().div_ceil(3) * 4);
    for chunk in token.as_bytes().chunks(3) {
        let bits =
            chunk.iter().enumerate().fold(0u32, |bits, (index, byte)| bits | (u32::from(*byte) << (16 - 8 * index)));
        for index in 0..=chunk.len() {
            encoded.push(BASE64URL[((bits >> (18 - 6 * index)) & 0x3f) as usize] as char);
        }
    }
    encoded
}

/// The store's token back from a client's; `None` for one this host did not give out.
fn decode(token: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(token.len() / 4 * 3 + 2);
    for chunk in token.as_bytes().chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut bits = 0u32;
        for (index, symbol) in chunk.iter().enumerate() {
            let value = BASE64URL.iter().position(|candidate| candidate == symbol)?;
            bits |= (value as u32) << (18 - 6 * index);
        }
        bytes.extend((0..chunk.len() - 1).map(|index| (bits >> (16 - 8 * index)) as u8));
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_as_ascii() {
        for token in ["", "@", "@counter@c1", "@counter@ключ", "@a@b\u{1F600}", "@xy@z", "заказ-7", "a b/c?d"]
        {
            let encoded = encode(token);
            assert!(
                encoded.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'),
                "{encoded}"
            );
            assert_eq!(decode(&encoded).as_deref(), Some(token));
        }
        assert_eq!(encode("@counter@c1"), "QGNvdW50ZXJAYzE");
        assert!(decode("not base64!").is_none());
        assert!(decode("QGNvd").is_none(), "a lone last symbol");
        assert!(decode("_w").is_none(), "not UTF-8");
    }

    #[test]
    fn requests_without_a_token_start_at_the_first_page() {
        let mut headers = HeaderMap::new();
        assert_eq!(from_request(&headers, "an instance list").unwrap(), None);
        for first_page in ["", " ", "null"] {
            headers.insert(CONTINUATION_HEADER, HeaderValue::from_static(first_page));
            assert_eq!(from_request(&headers, "an instance list").unwrap(), None, "{first_page:?}");
        }
        headers.insert(CONTINUATION_HEADER, HeaderValue::from_str(&encode("заказ-7")).unwrap());
        assert_eq!(from_request(&headers, "an instance list").unwrap().as_deref(), Some("заказ-7"));
        headers.insert(CONTINUATION_HEADER, HeaderValue::from_static("!"));
        assert!(from_request(&headers, "an instance list").is_err());
    }
}
