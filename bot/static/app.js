// tastefeed gallery: rate with a click or a key, move between cards with ← →.
//
// Keys are taken only where they mean something, and never from a form field (typing there, and
// ↑ ↓ there, stay the field's): For you: ← → (or j/k) move between cards, 1-5 rate the focused
// one; Picture: 1-5 rate it; Compare: ← → pick, ↓ or s skip, u undo last. Everywhere else, and
// ↑ ↓ on every page but Compare, the keys do what the browser does: scroll the page.
(() => {
  // cards that can be rated: For you's (to move between) and the Picture page's one
  const cards = Array.from(document.querySelectorAll("article.card")).filter((c) => c.querySelector("form.rate"));
  const single = document.querySelector("div.card form.rate") ? document.querySelector("div.card") : null;
  let at = -1;

  // Mark card i as the one the keys act on; scroll it into view only when asked (a key or a
  // rating moved to it), and only as far as needed: opening a page never scrolls it.
  function focusCard(i, scroll) {
    if (!cards.length) return;
    at = Math.max(0, Math.min(cards.length - 1, i));
    cards.forEach((c) => c.classList.remove("focused"));
    const card = cards[at];
    card.classList.add("focused");
    if (scroll) card.scrollIntoView({ block: "nearest", behavior: "smooth" });
  }

  async function post(url, body) {
    const resp = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body || {}),
      credentials: "same-origin",
    });
    if (!resp.ok) throw new Error(`${resp.status} ${await resp.text()}`);
    return resp.json();
  }

  async function rate(card, value) {
    const state = card.querySelector(".state, .current");
    try {
      await post(`/rate/${card.dataset.id}`, { value });
    } catch (err) {
      if (state) state.textContent = `not saved: ${err.message}`;
      return;
    }
    card.dataset.rated = String(value);
    card.querySelectorAll("form.rate button").forEach((b) => b.classList.toggle("chosen", b.value === String(value)));
    if (card.tagName === "ARTICLE") {
      card.classList.add("rated");
      if (state) state.textContent = `rated ${value}`;
      if (cards.includes(card)) focusCard(cards.indexOf(card) + 1, true);
    } else if (state) {
      state.textContent = String(value);
    }
  }

  document.querySelectorAll("form.rate").forEach((form) => {
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const card = form.closest(".card");
      if (card && e.submitter) rate(card, Number(e.submitter.value));
    });
  });

  document.querySelectorAll("form.undo").forEach((form) => {
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const card = form.closest(".card");
      try {
        await post(form.action);
        card.remove();
      } catch (err) {
        form.querySelector("button").textContent = "failed";
      }
    });
  });

  // Picture page: a click on a face box (or its entry in the list) opens that face's naming form;
  // the forms post as JSON and the page reloads to show the name (without JS they post plainly).
  function openFace(id) {
    const entry = document.getElementById(`face-${id}`);
    if (!entry) return;
    document.querySelectorAll("svg.faces rect.face, ol.facelist li").forEach((el) =>
      el.classList.toggle("selected", el.dataset.face === String(id)));
    const details = entry.querySelector("details.name-face");
    details.open = true;
    const input = details.querySelector("input[name=name]");
    input.focus();
    input.select();
  }

  document.querySelectorAll("svg.faces a[data-face]").forEach((a) => {
    a.addEventListener("click", (e) => {
      e.preventDefault();
      openFace(a.dataset.face);
    });
  });

  document.querySelectorAll("ol.facelist li[data-face]").forEach((li) => {
    li.addEventListener("click", (e) => {
      if (!e.target.closest("form, summary")) openFace(li.dataset.face);
    });
    li.addEventListener("keydown", (e) => {
      if (e.key === "Escape") li.querySelector("details.name-face").open = false;
    });
  });

  document.querySelectorAll("form.name-face, form.unname-face").forEach((form) => {
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const input = form.querySelector("input[name=name]");
      const state = form.closest("li").querySelector(".name-state");
      try {
        await post(form.action, input ? { name: input.value } : {});
      } catch (err) {
        if (state) state.textContent = err.message.replace(/^\d+ /, "");
        return;
      }
      window.location.reload();
    });
  });

  // Compare page: ← picks the left picture, → the right one, ↓ or s skips, u takes the last back;
  // each clicks its button, so the form posts as without script (once: a held key does not answer twice).
  const compare = document.querySelector("form.compare");
  const undoCompare = document.querySelector("form.undo-compare");
  const compareKeys = { ArrowLeft: "button.pick.left", ArrowRight: "button.pick.right", ArrowDown: "button.skip", s: "button.skip" };
  let answered = false;

  function compareKey(e) {
    let button = compare && compareKeys[e.key] ? compare.querySelector(compareKeys[e.key]) : null;
    if (e.key === "u" && undoCompare) button = undoCompare.querySelector("button");
    if (!button) return;
    e.preventDefault();
    if (answered) return;
    answered = true;
    button.classList.add("chosen");
    button.click();
  }

  // Tables fit the window (style.css): a cell with a long unbroken word is marked "long" (it
  // may break anywhere); on a phone, where a table is stacked, each cell shows its column's name,
  // taken from the header row (the cells of one <tr> all <th>).
  document.querySelectorAll("table").forEach((table) => {
    const rows = Array.from(table.rows);
    table.querySelectorAll("td, th").forEach((cell) => {
      if (/\S{24,}/.test(cell.textContent)) cell.classList.add("long");
    });
    const head = rows.find((r) => r.cells.length > 1 && Array.from(r.cells).every((c) => c.tagName === "TH"));
    if (!head) return;
    const names = Array.from(head.cells).map((c) => c.textContent.trim());
    rows.forEach((row) => Array.from(row.cells).forEach((cell, i) => {
      if (cell.tagName === "TD" && !cell.hasAttribute("data-label")) cell.dataset.label = cell.colSpan > 1 ? "" : names[i] || "";
    }));
  });

  // True when the key belongs to a form field (or an editable element): the page leaves it alone.
  function inField(target) {
    return Boolean(target.closest && target.closest("input, textarea, select, [contenteditable]"));
  }

  const moveKeys = { ArrowRight: 1, j: 1, ArrowLeft: -1, k: -1 };

  document.addEventListener("keydown", (e) => {
    if (inField(e.target) || e.altKey || e.ctrlKey || e.metaKey || e.isComposing) return;
    if (compare || undoCompare) {
      compareKey(e);
      return;
    }
    if (cards.length && moveKeys[e.key]) {
      focusCard(at + moveKeys[e.key], true);
      e.preventDefault();
    } else if (/^[1-5]$/.test(e.key) && (cards.length || single)) {
      if (cards.length && at < 0) focusCard(0, true);
      rate(cards.length ? cards[at] : single, Number(e.key));
      e.preventDefault();
    }
  });

  if (cards.length) focusCard(0, false);
})();
