// tastefeed gallery: rate with a click or a key, move with the arrow keys.
(() => {
  const cards = Array.from(document.querySelectorAll("article.card, div.card"));
  let at = -1;

  function focusCard(i) {
    if (!cards.length) return;
    at = Math.max(0, Math.min(cards.length - 1, i));
    cards.forEach((c) => c.classList.remove("focused"));
    const card = cards[at];
    card.classList.add("focused");
    card.scrollIntoView({ block: "center", behavior: "smooth" });
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
      focusCard(cards.indexOf(card) + 1);
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

  document.addEventListener("keydown", (e) => {
    if (e.target.closest && e.target.closest("input, textarea, select")) return;
    if (e.altKey || e.ctrlKey || e.metaKey) return;
    if (compare || undoCompare) {
      compareKey(e);
      return;
    }
    if (e.key === "ArrowRight" || e.key === "ArrowDown" || e.key === "j") {
      focusCard(at + 1);
      e.preventDefault();
    } else if (e.key === "ArrowLeft" || e.key === "ArrowUp" || e.key === "k") {
      focusCard(at - 1);
      e.preventDefault();
    } else if (/^[1-5]$/.test(e.key) && cards.length) {
      if (at < 0) focusCard(0);
      rate(cards[at], Number(e.key));
      e.preventDefault();
    }
  });

  if (cards.length) focusCard(0);

  // Model page: while a training run is going, the page reloads itself to show its progress.
  const refresh = document.querySelector("[data-refresh]");
  if (refresh) setTimeout(() => window.location.reload(), Number(refresh.dataset.refresh) * 1000);
})();
