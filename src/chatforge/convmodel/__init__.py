"""convmodel's interface over chatforge's formats, engine and trainer.

``ConversationTokenizer`` encodes a conversation as ``input_ids``, ``token_type_ids``
and ``attention_mask`` in the model's prompt format (convmodel's layout for sep);
``ConversationModel`` loads a model, generates replies with transformers' knob names on
chatforge's engine, and fine-tunes on in-memory conversations with chatforge's trainer::

    from chatforge import ConversationModel, ConversationTokenizer
    tok = ConversationTokenizer.from_pretrained("tok/")
    tok(["Hello", "How are you"])       # input_ids, token_type_ids, attention_mask
    model = ConversationModel.from_pretrained("my-gpt2/")
    model.generate(["Hello", "How are you"], do_sample=True, top_p=0.95, seed=0).responses
"""

from chatforge.convmodel.model import ConversationModel, ConversationModelOutput
from chatforge.convmodel.tokenizer import ConversationTokenizer

__all__ = ["ConversationModel", "ConversationModelOutput", "ConversationTokenizer"]
