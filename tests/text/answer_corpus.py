"""phi-2-style outputs, each with the question it answered and the answer a reader should see.

Written by hand in the manner of phi-2 after `Instruct: <question>\\nOutput:` (a leading space, the
question often repeated, "Answer:" labels, invented follow-up questions answered at length, textbook
"Exercise" turns), from the source article's complaint and from phi-2's model card. Questions that
came from Japanese are in the stiff English MarianMT gives. `expected` is the ideal trimmed answer.
`known_miss` names the samples the rules get wrong on purpose of honesty: they are counted in the
precision and recall of docs/benchmarks.md and checked as expected failures in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    name: str
    question: str
    output: str  # what phi-2 wrote after the prompt, up to end-of-text or the length limit
    expected: str  # the answer alone
    known_miss: str = ""  # why the rules do not give `expected`, for samples they get wrong

    @property
    def tail_cut(self) -> bool:
        """Should the end of the output be cut (something other than the answer follows it)?"""
        return not self.output.rstrip().endswith(self.expected)


RATES = "How does the rise in interest rates affect the economic activities of individuals and companies?"

SAMPLES = [
    Sample(
        "article_rates_unlabelled_followups", RATES,
        " When interest rates rise, borrowing becomes more expensive for both individuals and companies."
        " Individuals may delay buying a home or a car, and companies may postpone investments in new"
        " factories or projects. At the same time, savers earn more on their deposits, so some people"
        " choose to save rather than spend.\n\n"
        "What are the most important factors to consider when investing in the stock market?\n"
        "The most important factors are the company's earnings, its level of debt, the quality of its"
        " management and the overall state of the economy. Investors should also think about their own"
        " goals and how much risk they can accept.\n\n"
        "How can a person reduce the risk of their investments?\n"
        "Diversification is the key. By spreading money across different assets, sectors and countries,"
        " an investor makes sure that a loss in one place is balanced by gains elsewhere.\n\n"
        "What is the difference between a stock and a bond?\n"
        "A stock is a share of ownership in a company, while a bond is a loan",
        "When interest rates rise, borrowing becomes more expensive for both individuals and companies."
        " Individuals may delay buying a home or a car, and companies may postpone investments in new"
        " factories or projects. At the same time, savers earn more on their deposits, so some people"
        " choose to save rather than spend.",
    ),
    Sample(
        "echo_then_answer_label_then_new_question", "What is a bond?",
        " What is a bond?\nAnswer: A bond is a loan that an investor makes to a company or a government."
        " In return, the issuer pays interest at regular intervals and repays the principal at maturity.\n\n"
        "What is a stock?\nAnswer: A stock is a share of ownership in a company. Stockholders may receive"
        " dividends and can sell their shares to other investors.\n\n"
        "What is a mutual fund?\nAnswer: A mutual fund pools money from many investors",
        "A bond is a loan that an investor makes to a company or a government. In return, the issuer pays"
        " interest at regular intervals and repays the principal at maturity.",
    ),
    Sample(
        "japanese_question_echoed_in_its_translation", "Please tell me the reason why the yen became weak.",
        " Please tell me the reason why the yen became weak.\nThe yen became weaker mainly because interest"
        " rates in Japan stayed low while rates in the United States rose. Investors moved money into"
        " dollar assets to earn higher returns, which pushed the dollar up against the yen.",
        "The yen became weaker mainly because interest rates in Japan stayed low while rates in the"
        " United States rose. Investors moved money into dollar assets to earn higher returns, which"
        " pushed the dollar up against the yen.",
    ),
    Sample(
        "echo_reworded_on_the_same_line", "How does inflation affect my savings?",
        " How does inflation affect your savings? Inflation reduces the purchasing power of money, so the"
        " same amount of savings buys less over time. If your savings account pays 1% while prices rise"
        " by 3% a year, you lose about 2% of real value every year.\n\n"
        "How can I protect my savings from inflation?\nYou can invest part of your savings in assets",
        "Inflation reduces the purchasing power of money, so the same amount of savings buys less over"
        " time. If your savings account pays 1% while prices rise by 3% a year, you lose about 2% of real"
        " value every year.",
    ),
    Sample(
        "japanese_question_echo_with_label_and_small_rewording",
        "Tell me about the merit of the index investment.",
        " Question: Tell me about the merits of index investment.\nAnswer: Index investing has low fees,"
        " because the fund simply follows a market index instead of paying managers to pick stocks. It"
        " also spreads your money across hundreds of companies.\n\n"
        "Question: What are the risks of index investment?\nAnswer: An index fund falls when the whole"
        " market falls.",
        "Index investing has low fees, because the fund simply follows a market index instead of paying"
        " managers to pick stocks. It also spreads your money across hundreds of companies.",
    ),
    Sample(
        "japanese_question_nisa_echo_and_followup", "What is the difference between NISA and iDeCo?",
        " What is the difference between NISA and iDeCo?\nNISA is a tax-free investment account that"
        " anyone can use, while iDeCo is a private pension plan. Money in iDeCo cannot be withdrawn until"
        " age 60, but contributions reduce your taxable income.\n\n"
        "Which is better for a 30-year-old office worker?\nFor most 30-year-olds, it makes sense to use"
        " both, starting with NISA because the money stays available.",
        "NISA is a tax-free investment account that anyone can use, while iDeCo is a private pension"
        " plan. Money in iDeCo cannot be withdrawn until age 60, but contributions reduce your taxable"
        " income.",
    ),
    Sample(
        "imperative_question_echoed_without_question_mark", "Explain what a credit score is.",
        " Explain what a credit score is.\n\nA credit score is a number that shows how likely you are to"
        " repay your debts. Lenders use it to decide whether to lend to you and at what interest rate.",
        "A credit score is a number that shows how likely you are to repay your debts. Lenders use it to"
        " decide whether to lend to you and at what interest rate.",
    ),
    Sample(
        "leading_output_label", "What is diversification?",
        " Output: Diversification means spreading your money across different kinds of investments, so"
        " that a fall in one of them does not ruin the whole portfolio.",
        "Diversification means spreading your money across different kinds of investments, so that a fall"
        " in one of them does not ruin the whole portfolio.",
    ),
    Sample(
        "leading_a_label", "Why do central banks raise interest rates?",
        " A: Central banks raise interest rates to slow down inflation. Higher rates make borrowing more"
        " expensive, which reduces spending and eases the pressure on prices.",
        "Central banks raise interest rates to slow down inflation. Higher rates make borrowing more"
        " expensive, which reduces spending and eases the pressure on prices.",
    ),
    Sample(
        "leading_bold_answer_label_then_exercise", "What is a Roth IRA?",
        " **Answer:** A Roth IRA is a retirement account in the United States funded with money that has"
        " already been taxed. Withdrawals in retirement are tax-free.\n\n"
        "Exercise 1: Compare a Roth IRA with a traditional IRA.\nAnswer: In a traditional IRA",
        "A Roth IRA is a retirement account in the United States funded with money that has already been"
        " taxed. Withdrawals in retirement are tax-free.",
    ),
    Sample(
        "question_label_echo_answer_label_then_question_turn", "Why do central banks raise interest rates?",
        "\nQuestion: Why do central banks raise interest rates?\nAnswer: To slow down inflation. When"
        " borrowing costs more, households and firms spend less, and prices rise more slowly.\n"
        "Question: What happens to bond prices when interest rates rise?\nAnswer: They fall.",
        "To slow down inflation. When borrowing costs more, households and firms spend less, and prices"
        " rise more slowly.",
    ),
    Sample(
        "compound_interest_then_textbook_exercises", "What is compound interest?",
        " Compound interest is interest earned on both the original amount and on the interest that has"
        " already been added. For example, $100 at 5% a year grows to $105 after one year and $110.25"
        " after two.\n\n"
        "Exercise 2: Calculate the compound interest on $500 at 4% a year for three years.\n"
        "Answer: $500 x 1.04^3 = $562.43, so the interest is $62.43.\n\n"
        "Exercise 3: How long does it take money to double at 6% a year?\nAnswer: About 12 years.",
        "Compound interest is interest earned on both the original amount and on the interest that has"
        " already been added. For example, $100 at 5% a year grows to $105 after one year and $110.25"
        " after two.",
    ),
    Sample(
        "new_instruct_block", "What is an ETF?",
        " An ETF, or exchange-traded fund, is a fund that holds a basket of assets and trades on a stock"
        " exchange like a single share.\n\nInstruct: Explain the difference between an ETF and a mutual"
        " fund.\nOutput: ETFs trade all day,",
        "An ETF, or exchange-traded fund, is a fund that holds a basket of assets and trades on a stock"
        " exchange like a single share.",
    ),
    Sample(
        "follow_up_questions_label", "What is a recession?",
        " A recession is a significant fall in economic activity that lasts for months, usually seen in"
        " lower output, income and employment.\n\nFollow-up questions:\n1. What causes a recession?\n"
        "2. How do governments respond to a recession?",
        "A recession is a significant fall in economic activity that lasts for months, usually seen in"
        " lower output, income and employment.",
    ),
    Sample(
        "real_world_use_case_ramble", "What is a stop-loss order?",
        " A stop-loss order tells your broker to sell a stock automatically when its price falls to a level"
        " you choose, which limits your loss.\n\nReal-world use case: Alice bought shares of a technology"
        " company at $50 and set a stop-loss at $45.",
        "A stop-loss order tells your broker to sell a stock automatically when its price falls to a level"
        " you choose, which limits your loss.",
    ),
    Sample(
        "user_and_assistant_dialogue", "Is renting better than buying a house?",
        " It depends on how long you plan to stay, the price of homes compared with rents in your area, and"
        " whether you have savings for a down payment.\nUser: I plan to stay for ten years.\nAssistant:"
        " Then buying may be cheaper in the long run.",
        "It depends on how long you plan to stay, the price of homes compared with rents in your area, and"
        " whether you have savings for a down payment.",
    ),
    Sample(
        "end_of_text_then_another_document", "What is a budget?",
        " A budget is a plan for how you will spend and save your money each month.<|endoftext|>Chapter 3:"
        " The History of Banking\nBanks began in ancient Mesopotamia",
        "A budget is a plan for how you will spend and save your money each month.",
    ),
    Sample(
        "invented_question_after_a_single_newline", "What does GDP measure?",
        " GDP stands for gross domestic product. It measures the total value of goods and services"
        " produced in a country in a year.\nWhat is the difference between nominal and real GDP?\n"
        "Nominal GDP uses current prices, while real GDP is adjusted for inflation.",
        "GDP stands for gross domestic product. It measures the total value of goods and services produced"
        " in a country in a year.",
    ),
    Sample(
        "two_invented_questions_on_one_line", "What is a stock?",
        " A stock is a share of ownership in a company. If the company grows, the value of the stock"
        " usually grows too.\n\nWhat is a dividend? How is it taxed?\nA dividend is a payment a company"
        " makes to its shareholders out of its profits.",
        "A stock is a share of ownership in a company. If the company grows, the value of the stock usually"
        " grows too.",
    ),
    Sample(
        "invented_question_with_an_abbreviation", "Who decides interest rates?",
        " In most countries the central bank sets the short-term interest rate, and market forces decide"
        " the rest.\n\nHow does the U.S. Federal Reserve decide when to change interest rates?\nThe Fed"
        " looks at inflation and employment.",
        "In most countries the central bank sets the short-term interest rate, and market forces decide the"
        " rest.",
    ),
    Sample(
        "unprompted_faq_after_the_answer", "What is a savings account?",
        " A savings account is a bank account that pays interest on your deposits. It is a safe place to"
        " keep money you do not need right away.\n\n"
        "Q: How is a savings account different from a checking account?\n"
        "A: A checking account is meant for everyday payments and usually pays little or no interest.\n\n"
        "Q: How much should I keep in a savings account?\nA: Many advisers suggest three to six months",
        "A savings account is a bank account that pays interest on your deposits. It is a safe place to"
        " keep money you do not need right away.",
    ),
    Sample(
        "chatty_closing_question", "Do I have to pay tax on dividends?",
        " In most countries dividends are taxed as income, although many have lower rates for them or"
        " tax-free accounts that shelter them.\n\nDo you have any other questions about taxes?",
        "In most countries dividends are taxed as income, although many have lower rates for them or"
        " tax-free accounts that shelter them.",
    ),
    Sample(
        "echo_then_answer_then_question_after_a_single_newline", "What is liquidity?",
        " What is liquidity?\nLiquidity is how quickly an asset can be turned into cash without losing"
        " value. Cash is the most liquid asset; a house is one of the least.\nWhat is an illiquid asset?\n"
        "An illiquid asset is one that is hard to sell quickly",
        "Liquidity is how quickly an asset can be turned into cash without losing value. Cash is the most"
        " liquid asset; a house is one of the least.",
    ),
    # --- question marks that must stay --------------------------------------------------------------
    Sample(
        "rhetorical_question_inside_a_paragraph", "Should I pay off my debt or invest?",
        " It depends on the interest rate of your debt. Why does this matter? Because paying off a loan at"
        " 8% is like earning a guaranteed 8% return, which is hard to beat in the stock market. If your"
        " debt has a low rate, investing may make more sense.",
        "It depends on the interest rate of your debt. Why does this matter? Because paying off a loan at"
        " 8% is like earning a guaranteed 8% return, which is hard to beat in the stock market. If your"
        " debt has a low rate, investing may make more sense.",
    ),
    Sample(
        "paragraph_ending_in_a_rhetorical_question", "Is inflation always bad?",
        " Not always. A little inflation encourages people to spend and invest rather than hoard cash. But"
        " what happens when prices rise by 10% a year? Savings lose value quickly and planning becomes"
        " hard.\nThat is why most central banks aim for about 2%.",
        "Not always. A little inflation encourages people to spend and invest rather than hoard cash. But"
        " what happens when prices rise by 10% a year? Savings lose value quickly and planning becomes"
        " hard.\nThat is why most central banks aim for about 2%.",
    ),
    Sample(
        "rhetorical_opening_question_that_is_not_the_echo", "Is it a good idea to buy gold?",
        " Is gold a good investment? It can be, as a small part of a diversified portfolio. Gold often holds"
        " its value when stocks fall, but it pays no interest or dividends.",
        "Is gold a good investment? It can be, as a small part of a diversified portfolio. Gold often holds"
        " its value when stocks fall, but it pays no interest or dividends.",
    ),
    Sample(
        "one_word_rhetorical_line", "How big should an emergency fund be?",
        " Most experts recommend an emergency fund of three to six months of expenses.\nWhy?\nBecause a job"
        " loss or a medical bill can come suddenly, and the fund keeps you from borrowing at high rates.",
        "Most experts recommend an emergency fund of three to six months of expenses.\nWhy?\nBecause a job"
        " loss or a medical bill can come suddenly, and the fund keeps you from borrowing at high rates.",
    ),
    Sample(
        "fenced_code_with_question_marks_then_invented_exercise",
        "Write a Python function that gets the user's age.",
        " ```python\ndef get_age():\n    age = input(\"How old are you? \")\n    # Is the input a number?\n"
        "    if not age.isdigit():\n        return None\n    return int(age)\n```\n"
        "This function prompts the user and returns the age as an integer, or None if the input is not a"
        " number.\n\nCan you change the function so that it keeps asking until the user enters a number?\n\n"
        "```python\ndef get_age():\n    while True:",
        "```python\ndef get_age():\n    age = input(\"How old are you? \")\n    # Is the input a number?\n"
        "    if not age.isdigit():\n        return None\n    return int(age)\n```\n"
        "This function prompts the user and returns the age as an integer, or None if the input is not a"
        " number.",
    ),
    Sample(
        "fenced_code_with_a_question_line_of_its_own", "How do I check if a number is even in Python?",
        " Use the remainder operator:\n\n```python\nnumber = 10\nis_even = number % 2 == 0\n"
        "print(\"Is it even?\")\nWhat does this print?\nprint(is_even)\n```\n\n"
        "The expression `number % 2 == 0` is True for even numbers.",
        "Use the remainder operator:\n\n```python\nnumber = 10\nis_even = number % 2 == 0\n"
        "print(\"Is it even?\")\nWhat does this print?\nprint(is_even)\n```\n\n"
        "The expression `number % 2 == 0` is True for even numbers.",
    ),
    Sample(
        "indented_code_without_a_fence_then_exercise_question",
        "How do I compute the average of a list in Python?",
        " You can use the sum() and len() functions:\n\ndef average(numbers):\n    # What if the list is"
        " empty?\n    if not numbers:\n        return 0\n    return sum(numbers) / len(numbers)\n\n"
        "print(average([1, 2, 3]))\n\nWhat is the output of the code above?\n\nAnswer: 2.0",
        "You can use the sum() and len() functions:\n\ndef average(numbers):\n    # What if the list is"
        " empty?\n    if not numbers:\n        return 0\n    return sum(numbers) / len(numbers)\n\n"
        "print(average([1, 2, 3]))",
    ),
    Sample(
        "list_of_questions_the_answer_builds", "How can I tell if a stock is overvalued?",
        " You can start by asking yourself a few things:\n- Is the price-to-earnings ratio much higher than"
        " that of similar companies?\n- Are the company's earnings growing fast enough to justify the"
        " price?\n- Has the price risen mainly because of hype?\nIf the answer to most of these is yes, the"
        " stock may be overvalued.",
        "You can start by asking yourself a few things:\n- Is the price-to-earnings ratio much higher than"
        " that of similar companies?\n- Are the company's earnings growing fast enough to justify the"
        " price?\n- Has the price risen mainly because of hype?\nIf the answer to most of these is yes, the"
        " stock may be overvalued.",
    ),
    Sample(
        "unmarked_questions_after_a_colon", "How should I start making a budget?",
        " Start with three simple checks:\nHow much do I earn each month after tax?\nHow much do I spend on"
        " fixed costs such as rent?\nWhat is left for saving each month?\nWriting the answers down makes"
        " the budget concrete.",
        "Start with three simple checks:\nHow much do I earn each month after tax?\nHow much do I spend on"
        " fixed costs such as rent?\nWhat is left for saving each month?\nWriting the answers down makes"
        " the budget concrete.",
    ),
    Sample(
        "markdown_sections_with_question_headings", "How does a recession affect workers and businesses?",
        " ## Workers\nWorkers may lose their jobs or see their hours cut.\n\n"
        "## What happens to businesses?\nBusinesses see lower sales and often cut investment.",
        "## Workers\nWorkers may lose their jobs or see their hours cut.\n\n"
        "## What happens to businesses?\nBusinesses see lower sales and often cut investment.",
    ),
    # --- the user asked for questions ---------------------------------------------------------------
    Sample(
        "numbered_questions_the_user_asked_for",
        "List three questions an investor should ask before buying a stock.",
        " 1. What does the company sell, and how does it make money?\n2. Is the company's debt manageable"
        " compared with its earnings?\n3. Who are its competitors, and what is its advantage over them?",
        "1. What does the company sell, and how does it make money?\n2. Is the company's debt manageable"
        " compared with its earnings?\n3. Who are its competitors, and what is its advantage over them?",
    ),
    Sample(
        "asked_for_questions_then_labelled_exercise",
        "What questions should I ask my bank before taking out a mortgage?",
        " Here are some questions to ask:\n\nWhat is the interest rate, and is it fixed or variable?\n"
        "Are there any fees for paying off the loan early?\nHow much do I need for a down payment?\n\n"
        "Asking these questions helps you compare offers from different lenders.\n\n"
        "Exercise 2: Write three questions to ask a financial adviser.",
        "Here are some questions to ask:\n\nWhat is the interest rate, and is it fixed or variable?\n"
        "Are there any fees for paying off the loan early?\nHow much do I need for a down payment?\n\n"
        "Asking these questions helps you compare offers from different lenders.",
    ),
    Sample(
        "faq_the_user_asked_for", "Write a short FAQ about savings accounts.",
        " Q: What is a savings account?\nA: A bank account that pays interest on the money you keep in"
        " it.\n\nQ: Is my money safe in a savings account?\nA: In most countries deposits are insured up to"
        " a limit.\n\nQ: Can I withdraw money at any time?\nA: Usually yes, although some accounts limit"
        " the number of withdrawals per month.",
        "Q: What is a savings account?\nA: A bank account that pays interest on the money you keep in"
        " it.\n\nQ: Is my money safe in a savings account?\nA: In most countries deposits are insured up to"
        " a limit.\n\nQ: Can I withdraw money at any time?\nA: Usually yes, although some accounts limit"
        " the number of withdrawals per month.",
    ),
    Sample(
        "quiz_with_numbered_question_labels", "Write a quiz with two questions about inflation.",
        " Question 1: What is inflation?\nAnswer: A general rise in prices over time.\n\n"
        "Question 2: What does a central bank do to fight inflation?\nAnswer: It raises interest rates.",
        "Question 1: What is inflation?\nAnswer: A general rise in prices over time.\n\n"
        "Question 2: What does a central bank do to fight inflation?\nAnswer: It raises interest rates.",
    ),
    # --- what the rules get wrong -------------------------------------------------------------------
    Sample(
        "rhetorical_question_as_its_own_paragraph", "How can I protect my savings from inflation?",
        " Inflation slowly eats away the value of cash.\n\nSo what can you do about it?\n\nYou can keep an"
        " emergency fund in cash and invest the rest in assets that tend to rise with prices, such as"
        " stocks or inflation-linked bonds.",
        "Inflation slowly eats away the value of cash.\n\nSo what can you do about it?\n\nYou can keep an"
        " emergency fund in cash and invest the rest in assets that tend to rise with prices, such as"
        " stocks or inflation-linked bonds.",
        known_miss="a rhetorical question alone between paragraphs reads exactly like an invented one",
    ),
    Sample(
        "section_questions_without_headings", "How does a recession affect workers and businesses?",
        " How does it affect workers?\nWorkers may lose their jobs or see their hours cut.\n\n"
        "How does it affect businesses?\nBusinesses see lower sales and often cut investment.",
        "How does it affect workers?\nWorkers may lose their jobs or see their hours cut.\n\n"
        "How does it affect businesses?\nBusinesses see lower sales and often cut investment.",
        known_miss="plain-text section questions look like invented follow-ups (markdown headings are kept)",
    ),
    Sample(
        "invented_instruction_without_a_question_mark", "What does it mean to save money?",
        " Saving means putting part of your income aside for later instead of spending it now.\n\n"
        "Write a short story about a boy who saves money for a bicycle.\nTom wanted a new bicycle, so"
        " every week he put half of his pocket money in a jar.",
        "Saving means putting part of your income aside for later instead of spending it now.",
        known_miss="an invented instruction without a label or a question mark is not recognised",
    ),
    Sample(
        "invented_question_after_questions_the_user_asked_for",
        "List two questions to ask before opening a brokerage account.",
        " 1. What fees does the broker charge for each trade?\n2. Is my money protected if the broker"
        " fails?\n\nWhat is a brokerage account?\nA brokerage account is an account that lets you buy and"
        " sell investments.",
        "1. What fees does the broker charge for each trade?\n2. Is my money protected if the broker"
        " fails?",
        known_miss="when questions were asked for, no question line is cut, invented ones included",
    ),
]
