//! A small XML element tree on quick-xml, enough for XMPP stanzas, with
//! limits so that a hostile peer cannot make us parse forever.

use std::fmt::Write;

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};

/// Stanzas larger than this are refused (the SDK's largest, a video offer
/// with candidates, is a few kilobytes).
pub const MAX_STANZA_LEN: usize = 256 * 1024;
const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("stanza of {0} bytes is larger than {MAX_STANZA_LEN}")]
    TooLarge(usize),
    #[error("XML nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("malformed XML: {0}")]
    Malformed(String),
    #[error("no element in the frame")]
    Empty,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    /// Name as written, with any prefix (`stream:features`).
    pub name: String,
    pub attributes: Vec<(String, String)>,
    pub children: Vec<Element>,
    /// Concatenated text content of this element (not of its children).
    pub text: String,
}

impl Element {
    pub fn new(name: impl Into<String>) -> Self {
        Element {
            name: name.into(),
            ..Default::default()
        }
    }

    pub fn attr(mut self, name: &str, value: impl Into<String>) -> Self {
        self.set_attr(name, value);
        self
    }

    pub fn set_attr(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self.attributes.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.attributes.push((name.to_owned(), value)),
        }
    }

    pub fn child(mut self, child: Element) -> Self {
        self.children.push(child);
        self
    }

    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.text = text.into();
        self
    }

    pub fn get_attr(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The local name, without prefix.
    pub fn local_name(&self) -> &str {
        self.name.rsplit(':').next().unwrap_or(&self.name)
    }

    pub fn find(&self, local_name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.local_name() == local_name)
    }

    pub fn find_text(&self, local_name: &str) -> Option<&str> {
        self.find(local_name).map(|c| c.text.as_str())
    }

    /// Parses exactly one element (one WebSocket frame of RFC 7395).
    pub fn parse(input: &str) -> Result<Element, XmlError> {
        if input.len() > MAX_STANZA_LEN {
            return Err(XmlError::TooLarge(input.len()));
        }
        let mut reader = Reader::from_str(input);
        let mut stack: Vec<Element> = Vec::new();
        loop {
            let event = reader
                .read_event()
                .map_err(|e| XmlError::Malformed(e.to_string()))?;
            match event {
                Event::Start(start) => {
                    if stack.len() >= MAX_DEPTH {
                        return Err(XmlError::TooDeep);
                    }
                    stack.push(element_from(&start)?);
                }
                Event::Empty(start) => {
                    let element = element_from(&start)?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(element),
                        None => return finish(element, &mut reader),
                    }
                }
                Event::End(_) => {
                    let element = stack
                        .pop()
                        .ok_or_else(|| XmlError::Malformed("unbalanced end tag".into()))?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(element),
                        None => return finish(element, &mut reader),
                    }
                }
                Event::Text(text) => {
                    if let Some(current) = stack.last_mut() {
                        let text = text
                            .unescape()
                            .map_err(|e| XmlError::Malformed(e.to_string()))?;
                        current.text.push_str(&text);
                    }
                }
                Event::CData(data) => {
                    if let Some(current) = stack.last_mut() {
                        current.text.push_str(&String::from_utf8_lossy(&data));
                    }
                }
                Event::Eof => {
                    return Err(if stack.is_empty() {
                        XmlError::Empty
                    } else {
                        XmlError::Malformed(format!("<{}> is not closed", stack[0].name))
                    });
                }
                Event::DocType(_) => {
                    return Err(XmlError::Malformed("DTDs are not allowed".into()));
                }
                _ => {}
            }
        }
    }
}

fn finish(element: Element, reader: &mut Reader<&[u8]>) -> Result<Element, XmlError> {
    // Only whitespace may follow the element in its frame.
    loop {
        match reader
            .read_event()
            .map_err(|e| XmlError::Malformed(e.to_string()))?
        {
            Event::Eof => return Ok(element),
            Event::Text(t) if t.iter().all(u8::is_ascii_whitespace) => {}
            _ => {
                return Err(XmlError::Malformed(
                    "more than one element in a frame".into(),
                ));
            }
        }
    }
}

fn element_from(start: &BytesStart) -> Result<Element, XmlError> {
    let mut element = Element::new(String::from_utf8_lossy(start.name().as_ref()).into_owned());
    for attribute in start.attributes() {
        let attribute = attribute.map_err(|e| XmlError::Malformed(e.to_string()))?;
        let value = attribute
            .unescape_value()
            .map_err(|e| XmlError::Malformed(e.to_string()))?
            .into_owned();
        element.attributes.push((
            String::from_utf8_lossy(attribute.key.as_ref()).into_owned(),
            value,
        ));
    }
    Ok(element)
}

/// Escapes text for element content and attribute values. `\r` is kept as a
/// character reference so SDP's CRLF survives any XML parser on the way.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

impl std::fmt::Display for Element {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = String::new();
        write!(out, "<{}", self.name)?;
        for (name, value) in &self.attributes {
            write!(out, " {name}=\"{}\"", escape(value))?;
        }
        if self.children.is_empty() && self.text.is_empty() {
            out.push_str("/>");
            return f.write_str(&out);
        }
        out.push('>');
        out.push_str(&escape(&self.text));
        f.write_str(&out)?;
        for child in &self.children {
            write!(f, "{child}")?;
        }
        write!(f, "</{}>", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_writes_a_stanza() {
        let text = r#"<message to="1002-42@localhost" type="headline" xmlns="jabber:client"><extraParams xmlns="jabber:client"><sdp>v=0&#13;
o=- 1 &amp; 2</sdp><sdpMLineIndex/></extraParams></message>"#;
        let element = Element::parse(text).unwrap();
        assert_eq!(element.get_attr("type"), Some("headline"));
        let params = element.find("extraParams").unwrap();
        assert_eq!(params.find_text("sdp"), Some("v=0\r\no=- 1 & 2"));
        assert_eq!(params.find_text("sdpMLineIndex"), Some(""));
        let again = Element::parse(&element.to_string()).unwrap();
        assert_eq!(again, element);
    }

    #[test]
    fn refuses_hostile_input() {
        assert!(matches!(
            Element::parse("<a><b>"),
            Err(XmlError::Malformed(_))
        ));
        assert!(matches!(
            Element::parse(&"<a>".repeat(40)),
            Err(XmlError::TooDeep)
        ));
        assert!(matches!(
            Element::parse(&format!("<a>{}</a>", "x".repeat(MAX_STANZA_LEN))),
            Err(XmlError::TooLarge(_))
        ));
        assert!(matches!(
            Element::parse("<a/><b/>"),
            Err(XmlError::Malformed(_))
        ));
        assert!(Element::parse("<!DOCTYPE x [<!ENTITY a 'aaa'>]><x>&a;</x>").is_err());
        assert!(matches!(Element::parse(""), Err(XmlError::Empty)));
    }

    proptest! {
        #[test]
        fn arbitrary_frames_never_panic(text in "\\PC{0,300}") {
            let _ = Element::parse(&text);
        }

        #[test]
        fn text_round_trips(text in "\\PC{0,100}") {
            let element = Element::new("a").text(text.clone());
            let parsed = Element::parse(&element.to_string()).unwrap();
            prop_assert_eq!(parsed.text, text);
        }
    }
}
