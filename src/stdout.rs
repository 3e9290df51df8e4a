//! Writing to stdout.

/// Prints a line to stdout, ignoring a closed stdout (`luna start | head`, or a parent that
/// stopped reading): a server must not die because nobody reads its banner.
pub fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}
