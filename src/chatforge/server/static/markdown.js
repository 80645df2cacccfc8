// chatforge's Markdown: the small subset models write, rendered safely. Model text only
// ever becomes text nodes (DOM building, no innerHTML anywhere), so a reply holding
// <script> or <img onerror> shows as the characters it is. Blocks: ``` fences, headings,
// lists, quotes, rules, paragraphs; inline: `code`, **bold**, *italic*, [links](https://...)
// (http and https only).
"use strict";
const Markdown = (() => {
  function el(tag, parent, text) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  // One alternative per inline form; the first that matches at a position wins.
  const INLINE = new RegExp([
    /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source,             // 1, 2: code
    /\*\*(?=\S)([\s\S]*?\S)\*\*|(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)/.source, // 3, 4: bold
    /\*(?=\S)([^*]*?\S)\*|(?<!\w)_(?=\S)([^_]*?\S)_(?!\w)/.source,   // 5, 6: italic
    // (underscores inside words, as in snake_case_names, stay as they are)
    /\[([^\]\n]+)\]\((https?:\/\/[^\s()]+)\)/.source,          // 7, 8: link
  ].join("|"), "g");

  function inline(text, parent) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > last) parent.append(text.slice(last, m.index));
      if (m[1]) el("code", parent, m[2]);
      else if (m[3] || m[4]) inline(m[3] || m[4], el("strong", parent));
      else if (m[5] || m[6]) inline(m[5] || m[6], el("em", parent));
      else {
        const a = el("a", parent);
        a.href = m[8];  // matched ^https?:// above: never javascript: or data:
        a.target = "_blank";
        a.rel = "noopener noreferrer";
        inline(m[7], a);
      }
      last = m.index + m[0].length;
    }
    if (last < text.length) parent.append(text.slice(last));
  }

  const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)/;
  const HEADING = /^(#{1,6})\s+(.*)$/;
  const ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
  const BLOCK = /^\s*(```|~~~|#{1,6}\s|>|([-*+]|\d{1,9}[.)])\s)/;

  // Text -> a DocumentFragment. An unclosed fence (a reply still streaming) runs to the end.
  function render(text) {
    const root = document.createDocumentFragment();
    const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
    let i = 0, m;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) { i++; continue; }
      if ((m = FENCE.exec(line))) {
        const body = [];
        for (i++; i < lines.length && !lines[i].trim().startsWith(m[1]); i++) body.push(lines[i]);
        i++;
        const code = el("code", el("pre", root), body.join("\n"));
        if (m[2]) code.dataset.lang = m[2];
      } else if ((m = HEADING.exec(line))) {
        inline(m[2], el("h" + m[1].length, root));
        i++;
      } else if (RULE.test(line)) {
        el("hr", root);
        i++;
      } else if ((m = ITEM.exec(line))) {
        const ordered = /\d/.test(m[1]);
        const list = el(ordered ? "ol" : "ul", root);
        if (ordered && parseInt(m[1], 10) !== 1) list.start = parseInt(m[1], 10);
        while (i < lines.length && (m = ITEM.exec(lines[i])) && /\d/.test(m[1]) === ordered) {
          inline(m[2], el("li", list));
          i++;
        }
      } else if (/^\s*>/.test(line)) {
        const quoted = [];
        for (; i < lines.length && /^\s*>/.test(lines[i]); i++) {
          quoted.push(lines[i].replace(/^\s*> ?/, ""));
        }
        el("blockquote", root).appendChild(render(quoted.join("\n")));
      } else {
        // A paragraph: up to a blank line or the start of another block; newlines kept.
        const p = el("p", root);
        do {
          if (p.firstChild) el("br", p);
          inline(lines[i++], p);
        } while (i < lines.length && lines[i].trim() && !BLOCK.test(lines[i]));
      }
    }
    return root;
  }

  return {render};
})();
